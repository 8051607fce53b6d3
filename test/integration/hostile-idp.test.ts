/**
 * A hostile (or merely buggy) IdP echoes back what the broker sent it: the client secret, the
 * Authorization header, the refresh token, a cookie. None of it may reach a log line, an error or
 * a span, in plain or encoded form, however many times the broker retries.
 */
import { telemetry } from '../harness/telemetry-capture.js';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import { Writable } from 'node:stream';
import type { AddressInfo } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EnrollRequest, EnrollResponse } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient } from '../../scripts/dev/broker-client.js';
import { TEST_TIMINGS, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { devIdentity } from '../../scripts/dev/dev-identity.js';

const TENANT = 'diku';
const CLIENT_ID = 'broker-client';
// Short and not token-shaped: only knowing the secret can catch it, not its shape.
const SECRET = 'hunter2-Zk!q';
const COOKIE = 'sess-ab12';
const REFRESH_TOKEN = 'rt-plain-9';
const MIB = 1024 * 1024;

const b64 = (text: string): string => Buffer.from(text, 'utf8').toString('base64');
const b64url = (text: string): string => Buffer.from(text, 'utf8').toString('base64url');
const basicPair = `${CLIENT_ID}:${SECRET.replace('!', '%21')}`;

/** Every form the test looks for in everything the broker let out. */
const NEEDLES = [
  SECRET,
  b64(SECRET),
  b64(SECRET).replace(/=+$/, ''),
  b64url(SECRET),
  encodeURIComponent(SECRET),
  basicPair,
  b64(basicPair),
  b64(basicPair).replace(/=+$/, ''),
  b64url(basicPair),
  COOKIE,
  REFRESH_TOKEN,
];

interface HostileIdp {
  url: string;
  requests: { headers: IncomingMessage['headers']; body: string }[];
  close(): Promise<void>;
}

/** An OAuth2 token endpoint that echoes the request back in every field it answers with. */
async function startHostileIdp(): Promise<HostileIdp> {
  const requests: HostileIdp['requests'] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      requests.push({ headers: req.headers, body });
      const auth = req.headers.authorization ?? '';
      const decoded = Buffer.from(auth.replace(/^Basic /, ''), 'base64').toString('utf8');
      const transient = requests.length % 2 === 1;
      const description =
        `secret ${SECRET} b64 ${b64(SECRET)} b64url ${b64url(SECRET)} ` +
        `Authorization: ${auth} creds ${decoded} Cookie: idp_session=${COOKIE} body ${body}`;
      res.writeHead(transient ? 503 : 401, {
        'content-type': 'application/json',
        'set-cookie': `idp_session=${COOKIE}; Path=/`,
        'www-authenticate': `Basic realm="${auth}"`,
        'retry-after': '0',
      });
      res.end(
        JSON.stringify({
          // An unknown code goes to the detail too.
          error: transient ? `overloaded ${b64url(SECRET)} ${decoded}` : 'invalid_client',
          error_description: description,
          detail: { authorization: auth, cookie: `idp_session=${COOKIE}` },
        }),
      );
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/token`,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function enroll(client: BrokerClient, request: EnrollRequest): Promise<EnrollResponse> {
  return new Promise((resolve, reject) =>
    client.raw.enroll(request, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

async function settle(call: Promise<unknown>): Promise<unknown> {
  try {
    return await call;
  } catch (err) {
    return err;
  }
}

async function waitFor(check: () => boolean, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > until) throw new Error('timed out');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

let idp: HostileIdp;
const lines: string[] = [];
let broker: Awaited<ReturnType<typeof startInProcessBroker>>;
let client: BrokerClient;

beforeAll(async () => {
  idp = await startHostileIdp();
  const log = pino(
    { level: 'trace' },
    new Writable({
      write(chunk: Buffer, _encoding, done) {
        lines.push(chunk.toString('utf8'));
        done();
      },
    }),
  );
  broker = await startInProcessBroker(
    {
      TB_GRPC_ADDRESS: '127.0.0.1:0',
      TB_IDP_TOKEN_ENDPOINT: idp.url,
      TB_IDP_CLIENT_ID: CLIENT_ID,
      TB_IDP_CLIENT_SECRET: SECRET,
      TB_IDP_AUTH_METHOD: 'client_secret_basic',
      ...devIdentity().brokerEnv(),
      ...TEST_TIMINGS,
    },
    log,
  );
  client = new BrokerClient(broker.address);
});
afterAll(async () => {
  client?.close();
  await broker?.stop();
  await idp?.close();
});

describe('a hostile IdP', () => {
  it('echoes the secret, the Authorization header and a cookie, and none of it gets out', async () => {
    const outputs: string[] = [];
    // Enroll is all or nothing (issue 12): each attempt presents once, fails, and stores nothing,
    // so the caller tries several times and every answer it gets is checked.
    for (let attempt = 0; attempt < 4; attempt++) {
      const first = await settle(
        enroll(client, {
          tenant: TENANT,
          user: 'alice',
          idp: '',
          credential: { $case: 'refreshToken', value: REFRESH_TOKEN },
        }),
      );
      expect(first).toBeInstanceOf(Error);
      outputs.push(JSON.stringify(first), String(first));
      outputs.push((first as Error).message, (first as grpc.ServiceError).details);
    }
    await waitFor(() => idp.requests.length >= 4, 15_000);
    const read = await settle(client.getToken(TENANT, 'alice'));
    outputs.push(JSON.stringify(read), String(read));

    // The IdP really was sent the secret and saw it echoed (the test is not vacuous).
    expect(idp.requests[0]!.headers.authorization).toBe(`Basic ${b64(basicPair)}`);
    const logged = lines.join('');
    expect(logged).toContain('invalid_client');
    for (const span of telemetry.spans())
      outputs.push(
        JSON.stringify({
          name: span.name,
          attributes: span.attributes,
          status: span.status,
          events: span.events,
        }),
      );
    const everything = [logged, ...outputs].join('\n');
    for (const needle of NEEDLES)
      expect(everything, `found ${needle.length} chars`).not.toContain(needle);
  });

  it('refuses a 3 MiB refresh or subject token at Enroll, and the IdP sees no request', async () => {
    const huge = 'a'.repeat(3 * MIB);
    const refresh = (await settle(
      enroll(client, {
        tenant: TENANT,
        user: 'bob',
        idp: '',
        credential: { $case: 'refreshToken', value: huge },
      }),
    )) as grpc.ServiceError;
    expect(refresh.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(refresh.details).toBe('refresh_token is longer than 16384 bytes');
    const exchange = (await settle(
      enroll(client, {
        tenant: TENANT,
        user: 'bob',
        idp: '',
        credential: { $case: 'tokenExchange', value: { subjectToken: huge, subjectTokenType: '' } },
      }),
    )) as grpc.ServiceError;
    expect(exchange.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(exchange.details).toBe('token_exchange.subject_token is longer than 16384 bytes');
    // No request carried the huge token.
    expect(idp.requests.some((request) => request.body.length > MIB)).toBe(false);
  });
});
