/**
 * The sidecar against hostile local requests (issue 13, items 3, 4 and 7), with real sidecar
 * processes, an in-process broker (real gRPC, TLS and caller authentication) and the real OIDC
 * provider: only Host values naming the loopback are served (a DNS-rebinding page sends its own
 * name), every common proxy header is refused, 10,000 distinct users cannot all be subscribed,
 * and listed users with long names still get their token files.
 */
import { createHash } from 'node:crypto';
import { request } from 'node:http';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import {
  metricValue,
  startSidecarProcess,
  TOKEN_HEADER,
  type SidecarProcess,
  type TokenBody,
} from '../../scripts/dev/sidecar-process.js';

const TENANT = 'diku';
/** Fits NAME_MAX (255 bytes) as a file name; the old temporary file name did not. */
const LONG_USER = 'u'.repeat(250);
/** 200 characters, 400 bytes of UTF-8: no file name can hold it, so it is stored hashed. */
const WIDE_USER = 'ü'.repeat(200);

let oidc: OidcProviderHarness;
let broker: Awaited<ReturnType<typeof startInProcessBroker>>;
let client: BrokerClient;
let tcp: SidecarProcess;
let dir: string;

interface RawAnswer {
  status: number;
  body: string;
}

/** A GET with exactly the Host given (none when undefined), over TCP or the Unix socket. */
function rawGet(
  target: { port: number } | { socketPath: string },
  path: string,
  host: string | undefined,
  headers: Record<string, string> = {},
): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        ...('port' in target ? { host: '127.0.0.1', port: target.port } : target),
        path,
        agent: false,
        setHost: false,
        headers: host === undefined ? headers : { ...headers, host },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }),
        );
      },
    );
    req.on('error', reject);
    req.end();
  });
}

function codeOf(answer: RawAnswer): string | undefined {
  try {
    return (JSON.parse(answer.body) as { error?: { code?: string } }).error?.code;
  } catch {
    return undefined;
  }
}

beforeAll(async () => {
  oidc = await startOidcProvider({ accessTokenTtlSeconds: 300 });
  broker = await startInProcessBroker(brokerEnv(oidc));
  client = new BrokerClient(broker.address);
  for (const user of ['alice', LONG_USER, WIDE_USER])
    await client.enroll(TENANT, user, (await oidc.mintTokens(user)).refresh_token);
  dir = await mkdtemp(join(tmpdir(), 'tb-sidecar-hostile-'));
  tcp = await startSidecarProcess({
    TB_SIDECAR_BROKER_ADDRESS: broker.address,
    TB_SIDECAR_USERS: `${TENANT}/alice`,
    TB_SIDECAR_ALLOWED_USERS: `${TENANT}/*`,
    TB_SIDECAR_SAFETY_SKEW_MS: '1000',
  });
  await eventually(async () => (await tcp.get('/readyz')).status === 200, 10_000, 'ready');
}, 60_000);

afterAll(async () => {
  await tcp?.kill();
  client?.close();
  await broker?.stop();
  await oidc?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('the sidecar answers only requests straight from its own pod', () => {
  it('serves Host values naming the loopback (with or without its port) and refuses every other with 421 HOST_NOT_ALLOWED', async () => {
    const port = tcp.port!;
    const target = { port };
    const token = (await (await tcp.token(TENANT, 'alice')).json()) as TokenBody;
    const accepted = [
      '127.0.0.1',
      `127.0.0.1:${port}`,
      'localhost',
      `localhost:${port}`,
      `LocalHost:${port}`,
      '[::1]',
      `[::1]:${port}`,
    ];
    for (const host of accepted) {
      const answer = await rawGet(target, `/v1/tokens/${TENANT}/alice`, host, TOKEN_HEADER);
      expect(answer.status, host).toBe(200);
      expect((JSON.parse(answer.body) as TokenBody).generation, host).toBe(token.generation);
    }
    const refused = [
      'attacker.example',
      `attacker.example:${port}`,
      `localhost.attacker.example:${port}`,
      `127.0.0.1.nip.io:${port}`,
      `127.0.0.1:${port === 65_535 ? 1 : port + 1}`,
      '10.0.0.7',
      '127.0.0.2',
      `[::1]:${port}x`,
      undefined,
    ];
    for (const host of refused)
      for (const path of [`/v1/tokens/${TENANT}/alice`, '/readyz', '/metrics', '/healthz']) {
        const answer = await rawGet(target, path, host, TOKEN_HEADER);
        const what = `${String(host)} ${path}`;
        expect(answer.status, what).toBe(421);
        expect(codeOf(answer), what).toBe('HOST_NOT_ALLOWED');
        expect(answer.body.includes(token.access_token), what).toBe(false);
      }
    // A long hostile Host is quoted as a short prefix only.
    const long = await rawGet(target, '/healthz', `${'h'.repeat(5_000)}.example`);
    expect(long.status).toBe(421);
    expect(long.body.length).toBeLessThan(600);
  });

  it('refuses every common proxy header with 403 FORWARDED_REQUEST naming it', async () => {
    const port = tcp.port!;
    const headers = [
      'Forwarded',
      'X-Forwarded-For',
      'X-Forwarded-Host',
      'X-Forwarded-Proto',
      'X-Forwarded-Port',
      'X-Real-IP',
      'Via',
      'True-Client-IP',
      'X-Client-IP',
      'X-Cluster-Client-IP',
      'CF-Connecting-IP',
      'Fastly-Client-IP',
      'X-Original-URL',
      'X-Rewrite-URL',
      'X-Original-Host',
    ];
    for (const name of headers)
      for (const path of [`/v1/tokens/${TENANT}/alice`, '/readyz']) {
        const answer = await rawGet({ port }, path, `127.0.0.1:${port}`, {
          ...TOKEN_HEADER,
          [name]: name === 'Via' ? '1.1 proxy' : '10.1.2.3',
        });
        expect(answer.status, `${name} ${path}`).toBe(403);
        expect(codeOf(answer), name).toBe('FORWARDED_REQUEST');
        expect(answer.body, name).toContain(`"${name.toLowerCase()}`);
      }
    // Straight from the module it is still served.
    expect((await tcp.token(TENANT, 'alice')).status).toBe(200);
  });

  it('does not subscribe 10,000 distinct users: past TB_SIDECAR_MAX_USERS (default 1000) they get 429 TOO_MANY_USERS', async () => {
    const users = Array.from({ length: 10_000 }, (_, i) => `flood-${i}`);
    const statuses = new Map<number, number>();
    let next = 0;
    const worker = async () => {
      while (next < users.length) {
        const user = users[next++]!;
        const res = await tcp.token(TENANT, user, { wait: 0 });
        await res.arrayBuffer();
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
      }
    };
    await Promise.all(Array.from({ length: 16 }, worker));
    // alice is held already: 999 new users fit, the other 9,001 are refused.
    expect(statuses.get(429)).toBe(9_001);
    const watched = metricValue(
      await (await tcp.get('/metrics')).text(),
      'tb_sidecar_watched_users',
    );
    expect(watched).toBe(1_000);
    const answer = await tcp.token(TENANT, 'one-more', { wait: 0 });
    expect(answer.status).toBe(429);
    expect(answer.headers.get('retry-after')).toBe('60');
  }, 60_000);
});

describe('file sink with long user names', () => {
  it('writes a 250-character user under its name and a user over 255 bytes under sha256-<hex>; Host on the Unix socket is localhost or none', async () => {
    const socketPath = join(dir, 'sidecar.sock');
    const tokenDir = join(dir, 'tokens');
    const s = await startSidecarProcess({
      TB_SIDECAR_BROKER_ADDRESS: broker.address,
      TB_SIDECAR_SOCKET: socketPath,
      TB_SIDECAR_USERS: [LONG_USER, WIDE_USER].map((u) => `${TENANT}/${u}`).join(','),
      TB_SIDECAR_TOKEN_DIR: tokenDir,
      TB_SIDECAR_SAFETY_SKEW_MS: '1000',
    });
    try {
      await eventually(async () => (await s.get('/readyz')).status === 200, 10_000, 'ready');
      const hashed = `sha256-${createHash('sha256').update(WIDE_USER, 'utf8').digest('hex')}`;
      for (const [user, name] of [
        [LONG_USER, LONG_USER],
        [WIDE_USER, hashed],
      ] as const) {
        const served = (await (await s.token(TENANT, user)).json()) as TokenBody;
        await eventually(
          async () =>
            (await readFile(join(tokenDir, TENANT, name), 'utf8').catch(() => '')) ===
            served.access_token,
          5_000,
          `token file of a ${user.length}-character user`,
        );
      }
      // Nothing else there: no temporary file left behind.
      expect((await readdir(join(tokenDir, TENANT))).sort()).toEqual([hashed, LONG_USER].sort());
      expect(s.logs.some((l) => l.msg === 'token file update failed')).toBe(false);
      expect(s.logs.some((l) => String(l.msg).startsWith('token file under a hashed name'))).toBe(
        true,
      );

      const path = `/v1/tokens/${TENANT}/${LONG_USER}`;
      expect((await rawGet({ socketPath }, path, undefined, TOKEN_HEADER)).status).toBe(200);
      expect((await rawGet({ socketPath }, path, 'localhost', TOKEN_HEADER)).status).toBe(200);
      for (const host of ['attacker.example', '127.0.0.1:8181']) {
        const answer = await rawGet({ socketPath }, path, host, TOKEN_HEADER);
        expect(answer.status, host).toBe(421);
        expect(codeOf(answer), host).toBe('HOST_NOT_ALLOWED');
      }
    } finally {
      await s.kill();
    }
  }, 40_000);
});
