/**
 * The broker's own health and reflection services, over real gRPC on port 0, asked by clients
 * built independently of them: grpc-health-check's service definition and the reflection.proto
 * that @grpc/reflection ships (loaded with proto-loader), and the returned descriptors parsed
 * with @bufbuild/protobuf.
 */
import { createRequire } from 'node:module';
import * as grpc from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { fromBinary } from '@bufbuild/protobuf';
import { FileDescriptorProtoSchema } from '@bufbuild/protobuf/wkt';
import { service as healthService } from 'grpc-health-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DESCRIPTOR_FILES } from '../../gen/descriptor-files.js';
import { HealthStatus } from '../../broker/grpc/health-service.js';
import { ReflectionService } from '../../broker/grpc/reflection-service.js';

const BROKER = 'tokenbroker.v1.TokenBrokerService';
const SERVICES = [BROKER, 'grpc.health.v1.Health', 'grpc.reflection.v1.ServerReflection'];

interface ReflectionAnswer {
  validHost: string;
  originalRequest?: Record<string, unknown>;
  messageResponse: string;
  listServicesResponse?: { service: { name: string }[] };
  fileDescriptorResponse?: { fileDescriptorProto: Buffer[] };
  allExtensionNumbersResponse?: { baseTypeName: string; extensionNumber: number[] };
  errorResponse?: { errorCode: number; errorMessage: string };
}

type ReflectionClient = grpc.Client & {
  serverReflectionInfo(): grpc.ClientDuplexStream<object, ReflectionAnswer>;
};

let server: grpc.Server;
let address: string;
let health: HealthStatus;
const clients: grpc.Client[] = [];

function reflectionClient(version: 'v1' | 'v1alpha'): ReflectionClient {
  const require = createRequire(import.meta.url);
  const file = require.resolve(
    `@grpc/reflection/build/proto/grpc/reflection/${version}/reflection.proto`,
  );
  const pkg = grpc.loadPackageDefinition(
    loadSync(file, { keepCase: false, longs: Number, defaults: true, oneofs: true }),
  ) as unknown as {
    grpc: { reflection: Record<string, { ServerReflection: typeof grpc.Client }> };
  };
  const client = new pkg.grpc.reflection[version]!.ServerReflection(
    address,
    grpc.credentials.createInsecure(),
  ) as ReflectionClient;
  clients.push(client);
  return client;
}

/** Sends every request on one stream; resolves with the answers in order. */
async function ask(client: ReflectionClient, requests: object[]): Promise<ReflectionAnswer[]> {
  const stream = client.serverReflectionInfo();
  const answers: ReflectionAnswer[] = [];
  return new Promise((resolve, reject) => {
    stream.on('data', (answer: ReflectionAnswer) => {
      answers.push(answer);
      if (answers.length === requests.length) stream.end();
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(answers));
    for (const request of requests) stream.write(request);
  });
}

function fileNames(answer: ReflectionAnswer): string[] {
  return (answer.fileDescriptorResponse?.fileDescriptorProto ?? []).map(
    (bytes) => fromBinary(FileDescriptorProtoSchema, bytes).name,
  );
}

beforeAll(async () => {
  server = new grpc.Server();
  health = new HealthStatus(['', BROKER]);
  health.addToServer(server);
  new ReflectionService(DESCRIPTOR_FILES, SERVICES).addToServer(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(err) : resolve(bound),
    ),
  );
  address = `127.0.0.1:${port}`;
});

afterAll(async () => {
  for (const client of clients) client.close();
  await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
});

describe('health (grpc.health.v1)', () => {
  type HealthClient = grpc.Client & {
    check(
      req: { service: string },
      cb: (err: grpc.ServiceError | null, res: { status: string }) => void,
    ): void;
    watch(req: { service: string }): grpc.ClientReadableStream<{ status: string }>;
    list(
      req: object,
      cb: (
        err: grpc.ServiceError | null,
        res: { statuses: Record<string, { status: string }> },
      ) => void,
    ): void;
  };
  const client = () => {
    const Health = grpc.makeGenericClientConstructor(healthService, 'Health');
    const made = new Health(address, grpc.credentials.createInsecure()) as unknown as HealthClient;
    clients.push(made);
    return made;
  };
  const check = (c: HealthClient, service: string) =>
    new Promise<string>((resolve, reject) =>
      c.check({ service }, (err, res) => (err ? reject(err) : resolve(res.status))),
    );

  it('answers Check for known services, NOT_FOUND for others, and List for all', async () => {
    const c = client();
    health.set('', false);
    health.set(BROKER, false);
    expect(await check(c, BROKER)).toBe('NOT_SERVING');
    health.set(BROKER, true);
    expect(await check(c, BROKER)).toBe('SERVING');
    expect(await check(c, '')).toBe('NOT_SERVING');
    await expect(check(c, 'no.such.Service')).rejects.toMatchObject({
      code: grpc.status.NOT_FOUND,
      details: expect.stringContaining('no.such.Service') as unknown,
    });
    const listed = await new Promise<Record<string, { status: string }>>((resolve, reject) =>
      c.list({}, (err, res) => (err ? reject(err) : resolve(res.statuses))),
    );
    expect(listed).toEqual({ '': { status: 'NOT_SERVING' }, [BROKER]: { status: 'SERVING' } });
  });

  it('Watch sends the status now, then each change once, and SERVICE_UNKNOWN for others', async () => {
    const c = client();
    health.set(BROKER, true);
    const stream = c.watch({ service: BROKER });
    const seen: string[] = [];
    const three = new Promise<void>((resolve) =>
      stream.on('data', (res: { status: string }) => {
        seen.push(res.status);
        if (seen.length === 1) {
          health.set(BROKER, true); // no change: nothing sent
          health.set(BROKER, false);
          health.set(BROKER, true);
        }
        if (seen.length === 3) resolve();
      }),
    );
    stream.on('error', () => undefined);
    await three;
    stream.cancel();
    expect(seen).toEqual(['SERVING', 'NOT_SERVING', 'SERVING']);

    const unknown = c.watch({ service: 'no.such.Service' });
    unknown.on('error', () => undefined);
    const first = await new Promise<string>((resolve) =>
      unknown.once('data', (res: { status: string }) => resolve(res.status)),
    );
    unknown.cancel();
    expect(first).toBe('SERVICE_UNKNOWN');
  });

  it('refuses a status for a service it was not built with', () => {
    expect(() => health.set('other', true)).toThrow(/unknown health service "other"/);
  });
});

describe('reflection (grpc.reflection.v1 and v1alpha)', () => {
  it('lists the services it was given', async () => {
    const [answer] = await ask(reflectionClient('v1'), [{ host: 'h', listServices: '' }]);
    expect(answer!.listServicesResponse?.service.map((s) => s.name)).toEqual(SERVICES);
    expect(answer!.validHost).toBe('h');
    expect(answer!.originalRequest).toMatchObject({ listServices: '' });
  });

  it('serves the file of any symbol with its imports, on v1 and v1alpha', async () => {
    for (const version of ['v1', 'v1alpha'] as const) {
      const answers = await ask(reflectionClient(version), [
        { fileContainingSymbol: BROKER },
        { fileContainingSymbol: `${BROKER}.GetToken` },
        { fileContainingSymbol: '.tokenbroker.v1.TokenEvent' },
        { fileContainingSymbol: 'tokenbroker.v1.TokenEvent.access_token' },
        { fileContainingSymbol: 'google.protobuf.Timestamp' },
        { fileContainingSymbol: 'grpc.health.v1.HealthCheckResponse.ServingStatus' },
        { fileContainingSymbol: 'grpc.health.v1.HealthCheckResponse.SERVING' },
      ]);
      const broker = ['tokenbroker/v1/token_broker.proto', 'google/protobuf/timestamp.proto'];
      expect(answers.map(fileNames), version).toEqual([
        broker,
        broker,
        broker,
        broker,
        ['google/protobuf/timestamp.proto'],
        ['grpc/health/v1/health.proto'],
        ['grpc/health/v1/health.proto'],
      ]);
      // What a client needs to call the service: its methods, as declared.
      const file = fromBinary(
        FileDescriptorProtoSchema,
        answers[0]!.fileDescriptorResponse!.fileDescriptorProto[0]!,
      );
      expect(file.service[0]!.method.map((m) => m.name)).toContain('GetToken');
    }
  });

  it('serves a file by name and answers NOT_FOUND for what it does not hold', async () => {
    const answers = await ask(reflectionClient('v1'), [
      { fileByFilename: 'tokenbroker/v1/token_broker.proto' },
      { fileByFilename: 'nope.proto' },
      { fileContainingSymbol: 'tokenbroker.v1.Nope' },
      {
        fileContainingExtension: {
          containingType: 'tokenbroker.v1.TokenEvent',
          extensionNumber: 9,
        },
      },
      { allExtensionNumbersOfType: 'tokenbroker.v1.TokenEvent' },
      { allExtensionNumbersOfType: 'tokenbroker.v1.Nope' },
    ]);
    expect(fileNames(answers[0]!)).toEqual([
      'tokenbroker/v1/token_broker.proto',
      'google/protobuf/timestamp.proto',
    ]);
    for (const [i, text] of [
      [1, 'no file named "nope.proto"'],
      [2, 'no symbol named "tokenbroker.v1.Nope"'],
      [3, 'no extension 9 of "tokenbroker.v1.TokenEvent"'],
      [5, 'no message type named "tokenbroker.v1.Nope"'],
    ] as const) {
      expect(answers[i]!.errorResponse, `answer ${i}`).toEqual({
        errorCode: grpc.status.NOT_FOUND,
        errorMessage: text,
      });
    }
    expect(answers[4]!.allExtensionNumbersResponse).toEqual({
      baseTypeName: 'tokenbroker.v1.TokenEvent',
      extensionNumber: [],
    });
  });

  it('refuses, when built, a set with a missing import or a service it does not define', () => {
    const broker = DESCRIPTOR_FILES.find((f) => f.name === 'tokenbroker/v1/token_broker.proto')!;
    expect(() => new ReflectionService([broker], [BROKER])).toThrow(
      /imports "google\/protobuf\/timestamp.proto", which is not in the set/,
    );
    expect(() => new ReflectionService(DESCRIPTOR_FILES, ['no.such.Service'])).toThrow(
      /no descriptor defines service "no.such.Service"/,
    );
  });
});
