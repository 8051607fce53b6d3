import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { HealthImplementation, service as healthService } from 'grpc-health-check';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError } from '../../broker/errors.js';
import {
  peerCertificateIdentity,
  serverTlsCredentials,
  type PeerCertificateIdentity,
  type ServerTlsSettings,
} from '../../broker/grpc/server-tls.js';
import {
  clientTransport,
  type ClientTransport,
  type ClientTransportSettings,
} from '../../shared/grpc-client-credentials.js';
import { TlsFileError, type TlsLog } from '../../shared/watched-tls-files.js';
import {
  makeCa,
  makeLeaf,
  removeTestCerts,
  type TestCa,
  type TestLeaf,
} from '../harness/test-certs.js';

const SERVER_NAME = 'broker.test';
const REFRESH_MS = 40;

class RecordingLog implements TlsLog {
  readonly warnings: { fields: object; message: string }[] = [];
  readonly infos: { fields: object; message: string }[] = [];
  warn(fields: object, message: string): void {
    this.warnings.push({ fields, message });
  }
  info(fields: object, message: string): void {
    this.infos.push({ fields, message });
  }
}

interface SeenCall {
  method: string;
  authorization: string | undefined;
  peer: PeerCertificateIdentity | undefined;
}

interface RunningServer {
  port: number;
  health: HealthImplementation;
  seen: SeenCall[];
  log: RecordingLog;
}

const checkMethod = healthService.Check!;
const watchMethod = healthService.Watch!;

const servers: grpc.Server[] = [];
const clients: grpc.Client[] = [];
const dirs: string[] = [];

let ca: TestCa;
let otherCa: TestCa;
let rotatedCa: TestCa;
let clientCa: TestCa;
let leaf1: TestLeaf;
let leaf2: TestLeaf;
let rotatedLeaf: TestLeaf;
let clientLeaf: TestLeaf;
let rogueClientLeaf: TestLeaf;

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'tb-grpc-tls-'));
  dirs.push(dir);
  return dir;
}

/** Files the server reads, in a directory of their own so tests can rewrite them. */
function servedFiles(leaf: TestLeaf): { certFile: string; keyFile: string } {
  const dir = tempDir();
  const files = { certFile: join(dir, 'tls.crt'), keyFile: join(dir, 'tls.key') };
  writeFileSync(files.certFile, leaf.certPem);
  writeFileSync(files.keyFile, leaf.keyPem);
  return files;
}

async function startServer(
  credentials: (log: RecordingLog) => grpc.ServerCredentials,
): Promise<RunningServer> {
  const seen: SeenCall[] = [];
  const log = new RecordingLog();
  const recorder: grpc.ServerInterceptor = (method, call) =>
    new grpc.ServerInterceptingCall(call, {
      start(next) {
        next({
          onReceiveMetadata(metadata, passOn) {
            const [authorization] = metadata.get('authorization');
            seen.push({
              method: method.path,
              authorization: typeof authorization === 'string' ? authorization : undefined,
              peer: peerCertificateIdentity(call),
            });
            passOn(metadata);
          },
        });
      },
    });
  const server = new grpc.Server({ interceptors: [recorder] });
  servers.push(server);
  const health = new HealthImplementation({ '': 'SERVING' });
  health.addToServer(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', credentials(log), (error, bound) =>
      error ? reject(error) : resolve(bound),
    ),
  );
  return { port, health, seen, log };
}

function startTlsServer(settings: ServerTlsSettings): Promise<RunningServer> {
  return startServer((log) => serverTlsCredentials({ refreshMs: REFRESH_MS, ...settings }, log));
}

function newClient(port: number, transport: ClientTransport): grpc.Client {
  const client = new grpc.Client(`127.0.0.1:${port}`, transport.credentials, {
    ...transport.options,
    // Each client its own connection: a shared subchannel would hide what a new connection sees.
    'grpc.use_local_subchannel_pool': 1,
    interceptors: transport.interceptors,
  });
  clients.push(client);
  return client;
}

function trusting(
  caFile: string | undefined,
  extra: Partial<Exclude<ClientTransportSettings['tls'], 'off'>> = {},
  tokenFile?: string,
): ClientTransport {
  return clientTransport({
    tls: { caFile, serverName: SERVER_NAME, refreshMs: REFRESH_MS, ...extra },
    tokenFile,
    // Every call looks at the file: these tests change it between calls.
    tokenRecheckMs: 0,
  });
}

function check(client: grpc.Client): Promise<string> {
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      checkMethod.path,
      checkMethod.requestSerialize,
      checkMethod.responseDeserialize,
      { service: '' },
      new grpc.Metadata(),
      { deadline: Date.now() + 3000 },
      (error, response) => {
        if (error) reject(error);
        else resolve((response as { status: string }).status);
      },
    );
  });
}

async function checkFails(client: grpc.Client): Promise<grpc.ServiceError> {
  const outcome = await check(client).then(
    (status) => ({ status }),
    (error: grpc.ServiceError) => ({ error }),
  );
  if ('status' in outcome) throw new Error(`the call succeeded with ${outcome.status}`);
  return outcome.error;
}

/** A Watch stream and the statuses it delivered so far. */
function watch(client: grpc.Client): {
  statuses: string[];
  stream: grpc.ClientReadableStream<unknown>;
} {
  const statuses: string[] = [];
  const stream = client.makeServerStreamRequest(
    watchMethod.path,
    watchMethod.requestSerialize,
    watchMethod.responseDeserialize,
    { service: '' },
  );
  stream.on('data', (message: { status: string }) => statuses.push(message.status));
  stream.on('error', () => undefined);
  return { statuses, stream };
}

/** The certificate a fresh TLS connection gets, as a gRPC client would connect (ALPN h2). */
function servedSerial(port: number, caPem: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect(
      { host: '127.0.0.1', port, servername: SERVER_NAME, ca: caPem, ALPNProtocols: ['h2'] },
      () => {
        resolve(socket.getPeerCertificate().serialNumber);
        socket.destroy();
      },
    );
    socket.on('error', reject);
  });
}

async function eventually(assertion: () => Promise<void> | void, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await assertion();
      return;
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

beforeAll(async () => {
  [ca, otherCa, rotatedCa, clientCa] = await Promise.all([
    makeCa('tb-test-ca'),
    makeCa('tb-other-ca'),
    makeCa('tb-rotated-ca'),
    makeCa('tb-client-ca'),
  ]);
  const server = {
    commonName: 'token-broker',
    dnsNames: [SERVER_NAME],
    ipAddresses: ['127.0.0.1'],
  };
  [leaf1, leaf2, rotatedLeaf, clientLeaf, rogueClientLeaf] = await Promise.all([
    makeLeaf(ca, server),
    makeLeaf(ca, server),
    makeLeaf(rotatedCa, server),
    makeLeaf(clientCa, { commonName: 'mod-x', dnsNames: ['mod-x.folio.svc'], client: true }),
    makeLeaf(otherCa, { commonName: 'mod-x', client: true }),
  ]);
});

afterEach(() => {
  for (const client of clients.splice(0)) client.close();
  for (const server of servers.splice(0)) server.forceShutdown();
});

afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  removeTestCerts();
});

describe('gRPC listener TLS', () => {
  it('serves clients that trust its CA and verify its name, and refuses the rest', async () => {
    const server = await startTlsServer({ ...servedFiles(leaf1), clientCaFile: undefined });

    await expect(check(newClient(server.port, trusting(ca.certFile)))).resolves.toBe('SERVING');
    // Without a server name the address itself is verified: the certificate has IP 127.0.0.1.
    const byAddress = trusting(ca.certFile, { serverName: undefined });
    await expect(check(newClient(server.port, byAddress))).resolves.toBe('SERVING');
    expect(server.seen.at(-1)?.peer).toBeUndefined();

    const plaintext = clientTransport({ tls: 'off', tokenFile: undefined });
    expect((await checkFails(newClient(server.port, plaintext))).code).toBe(
      grpc.status.UNAVAILABLE,
    );

    const otherTrust = await checkFails(newClient(server.port, trusting(otherCa.certFile)));
    expect(otherTrust.code).toBe(grpc.status.UNAVAILABLE);
    expect(otherTrust.details).toMatch(/certificate/i);

    const wrongName = await checkFails(
      newClient(server.port, trusting(ca.certFile, { serverName: 'elsewhere.test' })),
    );
    expect(wrongName.code).toBe(grpc.status.UNAVAILABLE);
    expect(wrongName.details).toMatch(/elsewhere\.test/);

    // Default roots do not include a test CA: verification is on even without a CA file.
    const systemRoots = await checkFails(newClient(server.port, trusting(undefined)));
    expect(systemRoots.code).toBe(grpc.status.UNAVAILABLE);
    expect(server.seen).toHaveLength(2);
  });

  it('gives new connections a rotated certificate while an open Watch stream keeps delivering', async () => {
    const files = servedFiles(leaf1);
    const server = await startTlsServer({ ...files, clientCaFile: undefined });
    const streaming = newClient(server.port, trusting(ca.certFile));
    const stream = watch(streaming);
    await eventually(() => expect(stream.statuses).toEqual(['SERVING']));
    expect(await servedSerial(server.port, ca.certPem)).toBe(leaf1.serialNumber);

    // A rotation writes the certificate before the key: the pair in between must be refused.
    writeFileSync(files.certFile, leaf2.certPem);
    await eventually(() =>
      expect(server.log.warnings.map((w) => w.message).join('\n')).toMatch(
        /TB_TLS_KEY_FILE .*does not match the certificate in TB_TLS_CERT_FILE/,
      ),
    );
    expect(await servedSerial(server.port, ca.certPem)).toBe(leaf1.serialNumber);
    writeFileSync(files.keyFile, leaf2.keyPem);
    await eventually(async () =>
      expect(await servedSerial(server.port, ca.certPem)).toBe(leaf2.serialNumber),
    );
    await expect(check(newClient(server.port, trusting(ca.certFile)))).resolves.toBe('SERVING');

    server.health.setStatus('', 'NOT_SERVING');
    await eventually(() => expect(stream.statuses).toEqual(['SERVING', 'NOT_SERVING']));
  });

  it('follows a certificate from a new CA swapped in by symlink, and clients follow their CA file', async () => {
    // A Kubernetes Secret mount: tls.crt -> ..data/tls.crt, ..data -> a timestamped directory.
    const mount = tempDir();
    const publish = (name: string, leaf: TestLeaf): void => {
      mkdirSync(join(mount, name));
      writeFileSync(join(mount, name, 'tls.crt'), leaf.certPem);
      writeFileSync(join(mount, name, 'tls.key'), leaf.keyPem);
      symlinkSync(name, join(mount, '..data_tmp'));
      renameSync(join(mount, '..data_tmp'), join(mount, '..data'));
    };
    publish('..v1', leaf1);
    symlinkSync('..data/tls.crt', join(mount, 'tls.crt'));
    symlinkSync('..data/tls.key', join(mount, 'tls.key'));
    const clientTrust = join(tempDir(), 'ca.crt');
    writeFileSync(clientTrust, ca.certPem);

    const server = await startTlsServer({
      certFile: join(mount, 'tls.crt'),
      keyFile: join(mount, 'tls.key'),
      clientCaFile: undefined,
    });
    const following = trusting(clientTrust);
    const stream = watch(newClient(server.port, following));
    await eventually(() => expect(stream.statuses).toEqual(['SERVING']));

    publish('..v2', rotatedLeaf);
    writeFileSync(clientTrust, `${ca.certPem}${rotatedCa.certPem}`);
    await eventually(async () =>
      expect(await servedSerial(server.port, rotatedCa.certPem)).toBe(rotatedLeaf.serialNumber),
    );
    // The same transport, on a new channel, now trusts the rotated CA from its re-read file.
    await eventually(async () =>
      expect(await check(newClient(server.port, following))).toBe('SERVING'),
    );
    // A client still trusting only the old CA cannot connect anew: the new certificate is served.
    const stale = await checkFails(newClient(server.port, trusting(ca.certFile)));
    expect(stale.code).toBe(grpc.status.UNAVAILABLE);

    server.health.setStatus('', 'NOT_SERVING');
    await eventually(() => expect(stream.statuses).toEqual(['SERVING', 'NOT_SERVING']));
  });

  it('keeps the last good certificate when a broken file is written', async () => {
    const files = servedFiles(leaf1);
    const server = await startTlsServer({ ...files, clientCaFile: undefined });
    const keyBody = leaf1.keyPem.split('\n')[1]!;

    writeFileSync(files.certFile, leaf2.certPem.slice(0, leaf2.certPem.length / 2));
    writeFileSync(files.keyFile, leaf2.keyPem.slice(0, 40));
    await eventually(() =>
      expect(server.log.warnings.map((w) => w.message).join('\n')).toMatch(
        /TB_TLS_CERT_FILE \(.*tls\.crt\) is incomplete/,
      ),
    );
    await sleep(REFRESH_MS * 3);
    expect(await servedSerial(server.port, ca.certPem)).toBe(leaf1.serialNumber);
    await expect(check(newClient(server.port, trusting(ca.certFile)))).resolves.toBe('SERVING');

    writeFileSync(files.certFile, leaf2.certPem);
    await eventually(() =>
      expect(server.log.warnings.map((w) => w.message).join('\n')).toMatch(
        /TB_TLS_KEY_FILE \(.*tls\.key\) is not a usable/,
      ),
    );
    writeFileSync(files.keyFile, leaf2.keyPem);
    await eventually(async () =>
      expect(await servedSerial(server.port, ca.certPem)).toBe(leaf2.serialNumber),
    );
    const logged = JSON.stringify([server.log.warnings, server.log.infos]);
    expect(logged).not.toContain(keyBody);
    expect(logged).not.toContain(leaf2.keyPem.split('\n')[1]!);
  });

  it('requires and verifies client certificates when a client CA is set', async () => {
    const server = await startTlsServer({ ...servedFiles(leaf1), clientCaFile: clientCa.certFile });

    const anonymous = await checkFails(newClient(server.port, trusting(ca.certFile)));
    expect(anonymous.code).toBe(grpc.status.UNAVAILABLE);
    const rogue = await checkFails(
      newClient(
        server.port,
        trusting(ca.certFile, {
          certFile: rogueClientLeaf.certFile,
          keyFile: rogueClientLeaf.keyFile,
        }),
      ),
    );
    expect(rogue.code).toBe(grpc.status.UNAVAILABLE);
    expect(server.seen).toHaveLength(0);

    const holder = trusting(ca.certFile, {
      certFile: clientLeaf.certFile,
      keyFile: clientLeaf.keyFile,
    });
    await expect(check(newClient(server.port, holder))).resolves.toBe('SERVING');
    expect(server.seen).toHaveLength(1);
    expect(server.seen[0]!.peer).toMatchObject({
      commonName: 'mod-x',
      dnsNames: ['mod-x.folio.svc'],
      uris: [],
      serialNumber: clientLeaf.serialNumber,
    });
  });
});

describe('bearer token interceptor', () => {
  it('sends the token file as it is now on every call and stream, over TLS and plaintext', async () => {
    const tokenFile = join(tempDir(), 'token');
    writeFileSync(tokenFile, 'token-aaa\n');
    const tlsServer = await startTlsServer({ ...servedFiles(leaf1), clientCaFile: undefined });
    const client = newClient(tlsServer.port, trusting(ca.certFile, {}, tokenFile));

    await check(client);
    // Same size, rewritten in place: the stat cache must still notice.
    writeFileSync(tokenFile, 'token-bbb\n');
    await check(client);
    // Replaced by rename, as atomic writers (and kubelet's symlink swap) do.
    writeFileSync(`${tokenFile}.new`, 'token-ccc');
    renameSync(`${tokenFile}.new`, tokenFile);
    const stream = watch(client);
    await eventually(() => expect(stream.statuses).toEqual(['SERVING']));
    expect(tlsServer.seen.map((s) => s.authorization)).toEqual([
      'Bearer token-aaa',
      'Bearer token-bbb',
      'Bearer token-ccc',
    ]);
    expect(tlsServer.seen.at(-1)!.method).toBe(watchMethod.path);

    const plainServer = await startServer(() => grpc.ServerCredentials.createInsecure());
    const plain = clientTransport({ tls: 'off', tokenFile, tokenRecheckMs: 0 });
    await check(newClient(plainServer.port, plain));
    expect(plainServer.seen.map((s) => s.authorization)).toEqual(['Bearer token-ccc']);
  });

  it('looks at the token file at most once per recheck interval, then sends the new token', async () => {
    const tokenFile = join(tempDir(), 'token');
    writeFileSync(tokenFile, 'token-one');
    const server = await startServer(() => grpc.ServerCredentials.createInsecure());
    const client = newClient(
      server.port,
      clientTransport({ tls: 'off', tokenFile, tokenRecheckMs: 300 }),
    );
    await check(client);
    writeFileSync(tokenFile, 'token-two');
    await check(client);
    await new Promise((r) => setTimeout(r, 350));
    await check(client);
    expect(server.seen.map((c) => c.authorization)).toEqual([
      'Bearer token-one',
      'Bearer token-one',
      'Bearer token-two',
    ]);
  });

  it('fails a call clearly, naming the file, when the token file is missing', async () => {
    const tokenFile = join(tempDir(), 'token');
    writeFileSync(tokenFile, 'token-aaa');
    const server = await startServer(() => grpc.ServerCredentials.createInsecure());
    const transport = clientTransport({
      tls: 'off',
      tokenFile,
      settingNames: { tokenFile: 'TB_SIDECAR_TOKEN_FILE' },
      tokenRecheckMs: 0,
    });
    const client = newClient(server.port, transport);
    await check(client);

    rmSync(tokenFile);
    const missing = await checkFails(client);
    expect(missing.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(missing.details).toContain(
      `TB_SIDECAR_TOKEN_FILE (${tokenFile}) cannot be read (ENOENT)`,
    );
    expect(missing.details).not.toContain('token-aaa');
    expect(server.seen).toHaveLength(1);

    writeFileSync(tokenFile, ' \n');
    const empty = await checkFails(client);
    expect(empty.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(empty.details).toContain('is empty');

    // grpc-js's own metadata check would quote the value in its error; ours must not.
    writeFileSync(tokenFile, 'secret-part one');
    const unsafe = await checkFails(client);
    expect(unsafe.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(unsafe.details).not.toContain('secret-part');
    expect(server.seen).toHaveLength(1);
  });
});

describe('start-up validation', () => {
  function startupError(settings: ServerTlsSettings): ConfigError {
    try {
      serverTlsCredentials(settings, new RecordingLog());
    } catch (error) {
      if (error instanceof ConfigError) return error;
      throw error;
    }
    throw new Error('serverTlsCredentials accepted the settings');
  }

  it('names the variable and what is wrong, without echoing key material', () => {
    const dir = tempDir();
    const garbage = join(dir, 'garbage.pem');
    writeFileSync(garbage, 'not a pem file\n');
    const good = { certFile: leaf1.certFile, keyFile: leaf1.keyFile, clientCaFile: undefined };

    const cases: [ServerTlsSettings, string, RegExp][] = [
      [
        { ...good, certFile: join(dir, 'absent.crt') },
        'TB_TLS_CERT_FILE',
        /cannot be read \(ENOENT\)/,
      ],
      [{ ...good, certFile: garbage }, 'TB_TLS_CERT_FILE', /holds no PEM certificate/],
      [
        { ...good, keyFile: join(dir, 'absent.key') },
        'TB_TLS_KEY_FILE',
        /cannot be read \(ENOENT\)/,
      ],
      [
        { ...good, keyFile: garbage },
        'TB_TLS_KEY_FILE',
        /is not a usable unencrypted PEM private key/,
      ],
      [
        { ...good, keyFile: leaf2.keyFile },
        'TB_TLS_KEY_FILE',
        /does not match the certificate in TB_TLS_CERT_FILE/,
      ],
      [{ ...good, clientCaFile: join(dir, 'absent-ca.crt') }, 'TB_TLS_CLIENT_CA_FILE', /ENOENT/],
      [{ ...good, clientCaFile: garbage }, 'TB_TLS_CLIENT_CA_FILE', /holds no PEM certificate/],
      [
        { ...good, clientCaFile: leaf1.keyFile },
        'TB_TLS_CLIENT_CA_FILE',
        /holds no PEM certificate/,
      ],
    ];
    for (const [settings, setting, problem] of cases) {
      const error = startupError(settings);
      expect(error.setting).toBe(setting);
      expect(error.message).toMatch(new RegExp(`^${setting} \\(`));
      expect(error.message).toMatch(problem);
      expect(error.message).not.toContain(leaf1.keyPem.split('\n')[1]!);
      expect(error.message).not.toContain(leaf2.keyPem.split('\n')[1]!);
    }
    expect(() => serverTlsCredentials(good, new RecordingLog())).not.toThrow();
  });

  it('refuses an unusable client CA file when the transport is built', () => {
    const build = (): ClientTransport =>
      clientTransport({
        tls: { caFile: join(tempDir(), 'absent.crt'), serverName: SERVER_NAME },
        tokenFile: undefined,
        settingNames: { caFile: 'TB_SIDECAR_BROKER_CA_FILE' },
      });
    expect(build).toThrow(TlsFileError);
    expect(build).toThrow(
      /^TB_SIDECAR_BROKER_CA_FILE \(.*absent\.crt\) cannot be read \(ENOENT\)$/,
    );
  });
});
