/**
 * The sidecar's HTTP API against a real broker (in-process, embedded mode, real gRPC) and a real
 * OIDC provider: request validation, waits, the min_generation pattern, terminal session states,
 * readiness, the file sink, the Unix socket, idle unsubscription, configuration errors, SIGTERM,
 * and keepalive against a broker process that stops answering.
 */
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess } from '../../scripts/dev/broker-process.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import {
  errorOf,
  metricValue,
  runSidecarToExit,
  startSidecarProcess,
  TOKEN_HEADER,
  type SidecarProcess,
  type TokenBody,
} from '../../scripts/dev/sidecar-process.js';

const TENANT = 'diku';
const MAX_WAIT_MS = 1_500;

let oidc: OidcProviderHarness;
let broker: Awaited<ReturnType<typeof startInProcessBroker>>;
let client: BrokerClient;
let sidecar: SidecarProcess;

async function enroll(user: string) {
  const minted = await oidc.mintTokens(user);
  return client.enroll(TENANT, user, minted.refresh_token);
}

async function tokenOf(res: Response): Promise<TokenBody> {
  expect(res.status).toBe(200);
  return (await res.json()) as TokenBody;
}

async function metrics(s: SidecarProcess): Promise<string> {
  return (await s.get('/metrics')).text();
}

beforeAll(async () => {
  // Long-lived tokens: no scheduled rotation interferes with the counts below.
  oidc = await startOidcProvider({ accessTokenTtlSeconds: 300 });
  broker = await startInProcessBroker(brokerEnv(oidc));
  client = new BrokerClient(broker.address);
  await enroll('alice');
  sidecar = await startSidecarProcess({
    TB_SIDECAR_BROKER_ADDRESS: broker.address,
    TB_SIDECAR_USERS: `${TENANT}/alice`,
    // These tests read other users of the tenant too (by default only the listed ones).
    TB_SIDECAR_ALLOWED_USERS: `${TENANT}/*`,
    TB_SIDECAR_MAX_WAIT_MS: String(MAX_WAIT_MS),
    TB_SIDECAR_SAFETY_SKEW_MS: '1000',
    TB_SIDECAR_IDLE_UNSUBSCRIBE_MS: '1000',
  });
  await eventually(async () => (await sidecar.get('/readyz')).status === 200, 10_000, 'ready');
}, 60_000);

afterAll(async () => {
  await sidecar?.kill();
  client?.close();
  await broker?.stop();
  await oidc?.close();
});

describe('sidecar HTTP API', () => {
  it('answers every bad request with a 4xx and a JSON error naming the problem, and keeps serving', async () => {
    const long = 'x'.repeat(300);
    const cases: [string, Record<string, string>, number, string, RegExp][] = [
      ['/v1/tokens/diku/alice', {}, 400, 'MISSING_HEADER', /X-Token-Broker: true/],
      ['/v1/tokens/diku/alice', { 'x-token-broker': 'yes' }, 400, 'MISSING_HEADER', /header/],
      [
        '/v1/tokens/diku/alice',
        { ...TOKEN_HEADER, 'x-forwarded-for': '10.1.2.3' },
        403,
        'FORWARDED_REQUEST',
        /proxy/,
      ],
      ['/v1/tokens/diku', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^path /],
      ['/v1/tokens/diku/alice/extra', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^path /],
      ['/v1/tokens//alice', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^tenant must not be empty/],
      ['/v1/tokens/diku/', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^user must not be empty/],
      [`/v1/tokens/diku/${long}`, TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^user .*256/],
      ['/v1/tokens/diku/%zz', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^user .*percent/],
      ['/v1/tokens/di%00ku/alice', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^tenant .*control/],
      ['/v1/tokens/diku/alice?wait=-1', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^wait /],
      ['/v1/tokens/diku/alice?wait=abc', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^wait /],
      ['/v1/tokens/diku/alice?wait=1e9', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^wait /],
      ['/v1/tokens/diku/alice?wait=99999999999', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^wait /],
      ['/v1/tokens/diku/alice?wait=', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /^wait /],
      ['/v1/tokens/diku/alice?wait=1&wait=2', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /once/],
      [
        '/v1/tokens/diku/alice?min_generation=-3',
        TOKEN_HEADER,
        400,
        'INVALID_PARAMETER',
        /^min_generation /,
      ],
      ['/v1/tokens/diku/alice?mingen=3', TOKEN_HEADER, 400, 'INVALID_PARAMETER', /"mingen"/],
      ['/v1/token/diku/alice', TOKEN_HEADER, 404, 'NOT_FOUND', /no route/],
      ['/', {}, 404, 'NOT_FOUND', /no route/],
      [`/${'a'.repeat(20_000)}`, TOKEN_HEADER, 431, 'REQUEST_TOO_LARGE', /16 KiB/],
    ];
    for (const [path, headers, status, code, message] of cases) {
      const res = await sidecar.get(path, headers);
      const what = `${path.slice(0, 60)} ${JSON.stringify(headers)}`;
      expect(res.status, what).toBe(status);
      expect(res.headers.get('content-type'), what).toContain('application/json');
      const error = await errorOf(res);
      expect(error.code, what).toBe(code);
      expect(error.message, what).toMatch(message);
    }
    const post = await fetch(`${sidecar.url}/v1/tokens/diku/alice`, {
      method: 'POST',
      headers: TOKEN_HEADER,
    });
    expect(post.status).toBe(405);
    expect(post.headers.get('allow')).toBe('GET');
    expect((await errorOf(post)).code).toBe('METHOD_NOT_ALLOWED');

    // Still serving, and still the same process.
    expect((await tokenOf(await sidecar.token(TENANT, 'alice'))).access_token).not.toBe('');
    expect((await sidecar.get('/healthz')).status).toBe(200);
    expect(sidecar.logs.some((l) => l.level === 50 || l.level === 60)).toBe(false);
  });

  it('caps an absurd wait: an unknown user gets 404 SESSION_NOT_FOUND after TB_SIDECAR_MAX_WAIT_MS', async () => {
    const started = Date.now();
    const res = await sidecar.token(TENANT, 'nobody', { wait: 2_000_000_000 });
    const took = Date.now() - started;
    expect(res.status).toBe(404);
    expect(await errorOf(res)).toMatchObject({ code: 'SESSION_NOT_FOUND' });
    expect(took).toBeGreaterThanOrEqual(MAX_WAIT_MS - 50);
    expect(took).toBeLessThan(MAX_WAIT_MS + 2_000);
    const now = await sidecar.token(TENANT, 'nobody', { wait: 0 });
    expect(now.status).toBe(404);
    await now.arrayBuffer();
  });

  it('serves JSON or, for Accept: text/plain, the bare token with its generation in a header', async () => {
    const json = await tokenOf(await sidecar.token(TENANT, 'alice'));
    expect(json.token_type).toBe('Bearer');
    expect(json.generation).toBeGreaterThan(0);
    expect(Date.parse(json.expires_at)).toBeGreaterThan(Date.now());
    expect(json.expires_in).toBeGreaterThan(200);
    const plain = await sidecar.token(TENANT, 'alice', { accept: 'text/plain' });
    expect(plain.status).toBe(200);
    expect(plain.headers.get('content-type')).toContain('text/plain');
    expect(plain.headers.get('cache-control')).toBe('no-store');
    expect(plain.headers.get('x-token-generation')).toBe(String(json.generation));
    expect((await plain.text()) === json.access_token).toBe(true);
  });

  it('min_generation after a 401: concurrent reads share one Refresh and all get the next generation', async () => {
    const current = await tokenOf(await sidecar.token(TENANT, 'alice'));
    const refreshesBefore = oidc.counters.refreshes;
    const callsBefore =
      metricValue(await metrics(sidecar), 'tb_sidecar_refresh_requests_total{outcome="ok"}') ?? 0;
    const answers = await Promise.all(
      Array.from({ length: 8 }, () =>
        sidecar.token(TENANT, 'alice', { minGeneration: current.generation + 1, wait: 1_500 }),
      ),
    );
    const bodies = await Promise.all(answers.map(tokenOf));
    for (const body of bodies) {
      expect(body.generation).toBe(current.generation + 1);
      expect(body.access_token === current.access_token).toBe(false);
    }
    expect(oidc.counters.refreshes - refreshesBefore).toBe(1);
    const callsAfter = metricValue(
      await metrics(sidecar),
      'tb_sidecar_refresh_requests_total{outcome="ok"}',
    );
    expect(callsAfter! - callsBefore).toBe(1);
    // Asking for a generation that never comes: 504 WAIT_TIMEOUT, not an older token.
    const late = await sidecar.token(TENANT, 'alice', {
      minGeneration: current.generation + 5,
      wait: 300,
    });
    expect(late.status).toBe(504);
    expect((await errorOf(late)).code).toBe('WAIT_TIMEOUT');
  });

  it('a first read waits for the first token of a user enrolled meanwhile', async () => {
    const reading = sidecar.token(TENANT, 'carol', { wait: MAX_WAIT_MS });
    await new Promise((r) => setTimeout(r, 200));
    await enroll('carol');
    const body = await tokenOf(await reading);
    expect(body.generation).toBeGreaterThan(0);
  });

  it('REAUTH_REQUIRED answers 409 and a revoked session 410, at once even with a wait', async () => {
    await enroll('dave');
    const dave = await tokenOf(await sidecar.token(TENANT, 'dave'));
    await oidc.revokeGrantOf('dave');
    await client.refresh(TENANT, 'dave', dave.generation).catch(() => undefined);
    await eventually(
      async () => {
        const res = await sidecar.token(TENANT, 'dave', { wait: 0 });
        await res.arrayBuffer();
        return res.status === 409;
      },
      10_000,
      '409 for dave',
    );
    const started = Date.now();
    const res = await sidecar.token(TENANT, 'dave', { wait: MAX_WAIT_MS });
    expect(Date.now() - started).toBeLessThan(500);
    expect(res.status).toBe(409);
    const error = await errorOf(res);
    expect(error.code).toBe('REAUTH_REQUIRED');
    expect(error.message).toMatch(/log in again/);

    await enroll('erin');
    await tokenOf(await sidecar.token(TENANT, 'erin'));
    await client.revoke(TENANT, 'erin');
    await eventually(
      async () => {
        const r = await sidecar.token(TENANT, 'erin', { wait: 0 });
        await r.arrayBuffer();
        return r.status === 410;
      },
      10_000,
      '410 for erin',
    );
    expect((await errorOf(await sidecar.token(TENANT, 'erin'))).code).toBe('SESSION_REVOKED');
  });

  it('unsubscribes users not read for TB_SIDECAR_IDLE_UNSUBSCRIBE_MS; listed users stay', async () => {
    await tokenOf(await sidecar.token(TENANT, 'carol'));
    await eventually(
      async () => metricValue(await metrics(sidecar), 'tb_sidecar_watched_users') === 1,
      5_000,
      'only the listed user watched',
    );
    expect(sidecar.logs.some((l) => l.msg === 'unsubscribed a user not read lately')).toBe(true);
    // Reading again subscribes again.
    await tokenOf(await sidecar.token(TENANT, 'carol'));
    expect(metricValue(await metrics(sidecar), 'tb_sidecar_watched_users')).toBe(2);
  });

  it('never prints a token value', async () => {
    const alice = await tokenOf(await sidecar.token(TENANT, 'alice'));
    expect(sidecar.output().includes(alice.access_token)).toBe(false);
    expect(sidecar.output()).toContain('broker stream up');
  });
});

describe('sidecar on a Unix socket with a file sink', () => {
  it('waits for listed users in /readyz, writes their token files (0600), and on SIGTERM answers waiting reads, removes the files and exits 0', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tb-sidecar-'));
    try {
      const socket = join(dir, 'sidecar.sock');
      const tokenDir = join(dir, 'tokens');
      const s = await startSidecarProcess({
        TB_SIDECAR_BROKER_ADDRESS: `dns:///127.0.0.1:${broker.port}`,
        TB_SIDECAR_SOCKET: socket,
        TB_SIDECAR_USERS: `${TENANT}/frank`,
        TB_SIDECAR_ALLOWED_USERS: `${TENANT}/*`,
        TB_SIDECAR_TOKEN_DIR: tokenDir,
        TB_SIDECAR_SAFETY_SKEW_MS: '1000',
      });
      const file = join(tokenDir, TENANT, 'frank');
      await eventually(
        async () => {
          const res = await s.get('/readyz');
          const body = (await res.json()) as { users: Record<string, string> };
          return res.status === 503 && body.users['diku/frank'] === 'SESSION_NOT_FOUND';
        },
        10_000,
        'not ready: frank unknown',
      );
      await enroll('frank');
      await eventually(async () => (await s.get('/readyz')).status === 200, 10_000, 'ready');
      const first = await tokenOf(await s.token(TENANT, 'frank'));
      await eventually(
        async () => (await readFile(file, 'utf8').catch(() => '')) === first.access_token,
        5_000,
        'token file',
      );
      expect((await stat(file)).mode & 0o777).toBe(0o600);

      await client.refresh(TENANT, 'frank', first.generation);
      const second = await tokenOf(
        await s.token(TENANT, 'frank', { minGeneration: first.generation + 1 }),
      );
      await eventually(
        async () => (await readFile(file, 'utf8')) === second.access_token,
        5_000,
        'rewritten token file',
      );

      const waiting = s.token(TENANT, 'nobody', { wait: 30_000 });
      await new Promise((r) => setTimeout(r, 300));
      const stopping = Date.now();
      const code = await s.stop();
      const answer = await waiting;
      expect(code).toBe(0);
      expect(Date.now() - stopping).toBeLessThan(2_000);
      expect(answer.status).toBe(404);
      await expect(stat(file)).rejects.toThrow(/ENOENT/);
      expect(s.output().includes(first.access_token)).toBe(false);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 40_000);

  it('stops at start-up with exit code 2 and names the bad variable', async () => {
    const runs = await Promise.all([
      runSidecarToExit({}),
      runSidecarToExit({ TB_SIDECAR_BROKER_ADDRESS: 'broker', TB_SIDECAR_PORT: '1' }),
      runSidecarToExit({ TB_SIDECAR_BROKER_ADDRESS: '127.0.0.1:1', TB_SIDECAR_PORT: 'http' }),
      runSidecarToExit({ TB_SIDECAR_BROKER_ADDRESS: '127.0.0.1:1', TB_SIDECAR_USER: 'a/b' }),
    ]);
    const expected = [
      'TB_SIDECAR_BROKER_ADDRESS',
      'TB_SIDECAR_BROKER_ADDRESS',
      'TB_SIDECAR_PORT',
      'TB_SIDECAR_USER',
    ];
    runs.forEach((run, i) => {
      expect(run.code).toBe(2);
      const fatal = run.logs.find((l) => l.level === 60);
      expect(fatal?.setting).toBe(expected[i]);
      expect(String(fatal?.msg)).toContain(expected[i]);
    });
  }, 30_000);
});

describe('a broker that stops answering (SIGSTOP, no TCP reset)', () => {
  it('is noticed by keepalive within seconds while cached tokens are still served, and the stream comes back', async () => {
    const frozen = await startBrokerProcess(brokerEnv(oidc));
    const frozenClient = new BrokerClient(frozen.address);
    let stopped = false;
    const s = await startSidecarProcess({
      TB_SIDECAR_BROKER_ADDRESS: frozen.address,
      TB_SIDECAR_USERS: `${TENANT}/gina`,
      TB_SIDECAR_KEEPALIVE_MS: '5000',
      TB_SIDECAR_RECONNECT_MAX_MS: '1000',
    });
    const broker = async () => {
      const body = (await (await s.get('/readyz')).json()) as { broker: { up: boolean } };
      return body.broker.up;
    };
    try {
      const minted = await oidc.mintTokens('gina');
      await frozenClient.enroll(TENANT, 'gina', minted.refresh_token);
      await eventually(async () => (await s.get('/readyz')).status === 200, 10_000, 'ready');
      process.kill(frozen.pid, 'SIGSTOP');
      stopped = true;
      const frozenAt = Date.now();
      await eventually(async () => !(await broker()), 15_000, 'dead stream noticed');
      const noticedMs = Date.now() - frozenAt;
      // keepalive 5 s + timeout 2.5 s, plus scheduling slack.
      expect(noticedMs).toBeLessThan(12_000);
      expect((await s.token(TENANT, 'gina', { wait: 0 })).status).toBe(200);
      process.kill(frozen.pid, 'SIGCONT');
      stopped = false;
      await eventually(broker, 15_000, 'stream up again');
      console.log(`frozen broker noticed after ${noticedMs} ms`);
    } finally {
      if (stopped) process.kill(frozen.pid, 'SIGCONT');
      frozenClient.close();
      await s.kill();
      await frozen.kill();
    }
  }, 60_000);
});
