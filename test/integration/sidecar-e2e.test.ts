/**
 * End to end with real processes: 2 broker replicas, 4 Redis nodes (state + 3 Redlock), the
 * in-process OIDC provider issuing 5 s JWT access tokens, 4 sidecars and a resource server that
 * verifies every token with zero clock tolerance. Simulated modules read through their sidecars
 * and call the resource server for TB_SIDECAR_E2E_MS (default 30 s: six token lifetimes); one broker is killed
 * mid-run. Then every broker goes down for longer than a token's life, and one comes back.
 */
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { freePort } from '../../scripts/dev/free-port.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';
import { startResourceServer, type ResourceServer } from '../../scripts/dev/resource-server.js';
import {
  errorOf,
  startSidecarProcess,
  type SidecarProcess,
  type TokenBody,
} from '../../scripts/dev/sidecar-process.js';

const E2E_MS = Number(process.env.TB_SIDECAR_E2E_MS ?? 30_000);
const AT_TTL_S = 5;
const SKEW_MS = 2_000;
/**
 * The least skew the sidecars apply: the configured one, or a quarter of the token's lifetime
 * when smaller. The lifetime runs from the broker's receipt to the JWT's `exp` (whole seconds),
 * so it may be up to a second short of AT_TTL_S.
 */
const EFFECTIVE_SKEW_MS = Math.min(SKEW_MS, ((AT_TTL_S - 1) * 1_000) / 4);
/**
 * The most skew a sidecar applies: the lifetime is at most a second over AT_TTL_S (the JWT's `exp`
 * is whole seconds, the receipt is later than the IdP's `iat`). A refusal with no more than this
 * left on the last token is the sidecar keeping its skew, not an error.
 */
const MAX_EFFECTIVE_SKEW_MS = Math.min(SKEW_MS, ((AT_TTL_S + 1) * 1_000) / 4);
const TENANT = 'diku';
const USERS = ['u0', 'u1', 'u2', 'u3', 'u4', 'u5'];
const AUDIENCE = 'https://resource.test';
const MODULE_WAIT_MS = 2_000;

/** Sidecar i serves users i, i+1, i+2 (mod 6): each user is watched by several sidecars. */
const usersOf = (i: number) => [0, 1, 2].map((k) => USERS[(i + k) % USERS.length]!);

interface ReadError {
  sidecar: number;
  user: string;
  status: number;
  code: string;
  startedAt: number;
  /** The last token this module got for the user had no more than the (largest) skew left. */
  justified: boolean;
  /** How long the last token this module got for the user had left when the read started. */
  leftMs: number | undefined;
}

interface ModuleStats {
  reads: number;
  errors: ReadError[];
  /** Served with no more than the skew left when the read started (never allowed). */
  staleServed: number;
  /** A generation lower than one served before (never allowed). */
  backwards: number;
  resourceCalls: number;
  rejected: number;
}

const sha = (s: string) => createHash('sha256').update(s).digest('hex');

let oidc: OidcProviderHarness;
let redis: RedisNodes;
let rs: ResourceServer;
let env: Record<string, string>;
const brokerPorts: number[] = [];
const brokers: BrokerProcess[] = [];
const sidecars: SidecarProcess[] = [];
/** Every access token served, to check that none appears in any log. */
const served = new Set<string>();
/** generation -> token hash, per user, across all sidecars: one token per generation. */
const tokenOfGeneration = new Map<string, string>();
const generationsSeen = new Map<string, Set<number>>();
/**
 * Users whose session the replica kill ended: see sessionsLostToTheKill. The second test enrolls
 * them again first, so it probes every user.
 */
const lostToTheKill = new Set<string>();
/** The replica the first test left running. */
let survivorAddress = '';

function startBroker(port: number): Promise<BrokerProcess> {
  return startBrokerProcess({ ...env, TB_GRPC_ADDRESS: `127.0.0.1:${port}` }).then((b) => {
    brokers.push(b);
    return b;
  });
}

/** A free port can be taken before the broker binds it: try another then. */
async function startOnFreePort(slot: number): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    brokerPorts[slot] = await freePort();
    try {
      await startBroker(brokerPorts[slot]);
      return;
    } catch (err) {
      if (attempt >= 3) throw err;
    }
  }
}

beforeAll(async () => {
  [oidc, redis] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: AT_TTL_S, jwtAccessTokens: { audience: AUDIENCE } }),
    startRedisNodes(4),
  ]);
  // Rotate at 30% of the 5 s life: 3.5 s left, of which the sidecar serves 1.5 s past the skew.
  env = brokerEnv(oidc, redisTopology(redis.urls), { TB_REFRESH_RATIO: '0.3' });
  await Promise.all([0, 1].map((i) => startOnFreePort(i)));
  const client = new BrokerClient(brokers[0]!.address);
  for (const user of USERS)
    await client.enroll(TENANT, user, (await oidc.mintTokens(user)).refresh_token);
  client.close();
  rs = await startResourceServer({
    issuer: oidc.issuer,
    jwksUri: oidc.jwksUri,
    audience: AUDIENCE,
  });
  const address = `ipv4:${brokerPorts.map((p) => `127.0.0.1:${p}`).join(',')}`;
  sidecars.push(
    ...(await Promise.all(
      [0, 1, 2, 3].map((i) =>
        startSidecarProcess({
          TB_SIDECAR_BROKER_ADDRESS: address,
          TB_SIDECAR_SAFETY_SKEW_MS: String(SKEW_MS),
          // One listed user each (prefetched, awaited by /readyz); the others subscribe on read.
          TB_SIDECAR_USERS: `${TENANT}/${usersOf(i)[0]}`,
          // Its module reads its other users too: the sidecar may serve any user of the tenant.
          TB_SIDECAR_ALLOWED_USERS: `${TENANT}/*`,
          TB_SIDECAR_RECONNECT_MAX_MS: '1000',
          TB_SIDECAR_KEEPALIVE_MS: '5000',
        }),
      ),
    )),
  );
}, 90_000);

afterAll(async () => {
  await Promise.all(sidecars.map((s) => s.kill()));
  await Promise.all(brokers.map((b) => b.kill()));
  await rs?.close();
  await redis?.stopAll();
  await oidc?.close();
});

async function readiness(s: SidecarProcess) {
  const res = await s.get('/readyz');
  const body = (await res.json()) as {
    ready: boolean;
    broker: { up: boolean; peer: string | null };
  };
  return { status: res.status, ...body };
}

async function callResource(token: string): Promise<number> {
  const res = await fetch(rs.url, { headers: { authorization: `Bearer ${token}` } });
  await res.arrayBuffer();
  return res.status;
}

function recordToken(user: string, body: TokenBody): void {
  served.add(body.access_token);
  const key = `${user}#${body.generation}`;
  const hash = sha(body.access_token);
  const known = tokenOfGeneration.get(key);
  if (known !== undefined && known !== hash)
    throw new Error(`two different tokens for ${user} generation ${body.generation}`);
  tokenOfGeneration.set(key, hash);
  let gens = generationsSeen.get(user);
  if (!gens) generationsSeen.set(user, (gens = new Set()));
  gens.add(body.generation);
}

/**
 * A replica killed (-9) after the IdP rotated a token and before it stored the answer takes the
 * new pair with it. The replica that takes the rotation over asks introspection, learns that the
 * refresh token was consumed, and ends the session REAUTH_REQUIRED (IDP_TOKEN_CONSUMED) instead
 * of presenting it again: the honest outcome of that kill, which only a session the victim had
 * in that window can get. Returns those sessions' users, as the survivor lists them.
 */
async function sessionsLostToTheKill(survivor: BrokerProcess): Promise<Set<string>> {
  const client = new BrokerClient(survivor.address);
  try {
    const page = await client.list(TENANT, 100);
    return new Set(
      page.sessions
        .filter(
          (s) =>
            s.status === SessionStatus.SESSION_STATUS_REAUTH_REQUIRED &&
            s.lastErrorCode === 'IDP_TOKEN_CONSUMED',
        )
        .map((s) => s.user),
    );
  } finally {
    client.close();
  }
}

const logged = (b: BrokerProcess, prefix: string) =>
  b.logs.filter((l) => typeof l.msg === 'string' && l.msg.startsWith(prefix)).length;

/** A module: reads each of its users' token, calls the resource server with it, repeats. */
async function runModule(i: number, until: number, stats: ModuleStats): Promise<void> {
  const sidecar = sidecars[i]!;
  const last = new Map<string, { generation: number; expiresAtMs: number }>();
  while (Date.now() < until) {
    for (const user of usersOf(i)) {
      const startedAt = Date.now();
      const prev = last.get(user);
      const res = await sidecar.token(TENANT, user, { wait: MODULE_WAIT_MS });
      stats.reads++;
      if (res.status !== 200) {
        const { code } = await errorOf(res);
        const leftMs = prev && prev.expiresAtMs - startedAt;
        const justified = leftMs !== undefined && leftMs <= MAX_EFFECTIVE_SKEW_MS;
        stats.errors.push({
          sidecar: i,
          user,
          status: res.status,
          code,
          startedAt,
          justified,
          leftMs,
        });
        continue;
      }
      const body = (await res.json()) as TokenBody;
      const expiresAtMs = Date.parse(body.expires_at);
      if (expiresAtMs - startedAt <= EFFECTIVE_SKEW_MS) stats.staleServed++;
      if (prev && body.generation < prev.generation) stats.backwards++;
      last.set(user, { generation: body.generation, expiresAtMs });
      recordToken(user, body);
      stats.resourceCalls++;
      if ((await callResource(body.access_token)) === 200) continue;
      stats.rejected++;
      // The documented 401 pattern: ask for a newer generation than the rejected one.
      await sidecar.token(TENANT, user, { wait: 5_000, minGeneration: body.generation + 1 });
    }
    await sleep(50);
  }
}

describe('sidecars end to end', () => {
  it(
    `modules read valid tokens for ${E2E_MS} ms while a broker replica dies: 0 rejections, 0 reuse`,
    async () => {
      for (const s of sidecars)
        await eventually(async () => (await readiness(s)).ready, 20_000, 'sidecar ready');
      // Warm up: every module's users are subscribed and hold a token.
      for (const [i, s] of sidecars.entries())
        for (const user of usersOf(i)) {
          const res = await s.token(TENANT, user, { wait: 10_000 });
          expect(res.status).toBe(200);
          recordToken(user, (await res.json()) as TokenBody);
        }

      const started = Date.now();
      const until = started + E2E_MS;
      const stats: ModuleStats[] = sidecars.map(() => ({
        reads: 0,
        errors: [],
        staleServed: 0,
        backwards: 0,
        resourceCalls: 0,
        rejected: 0,
      }));
      const modules = sidecars.map((_, i) => runModule(i, until, stats[i]!));

      // Mid-run, kill (-9) the replica that carries most sidecar streams.
      await sleep(Math.floor(E2E_MS * 0.4));
      const before = await Promise.all(sidecars.map(readiness));
      const onBroker = (b: BrokerProcess) =>
        before.filter((r) => r.broker.peer === b.address).length;
      const victim = onBroker(brokers[0]!) >= onBroker(brokers[1]!) ? brokers[0]! : brokers[1]!;
      const affected = before.flatMap((r, i) => (r.broker.peer === victim.address ? [i] : []));
      expect(affected.length).toBeGreaterThan(0);
      const killedAt = Date.now();
      await victim.kill();
      const failoverMs = await Promise.all(
        affected.map(async (i) => {
          await eventually(
            async () => {
              const r = await readiness(sidecars[i]!);
              return r.broker.up && r.broker.peer !== null && r.broker.peer !== victim.address;
            },
            10_000,
            `sidecar ${i} on another replica`,
          );
          return Date.now() - killedAt;
        }),
      );
      await Promise.all(modules);

      const survivor = brokers.find((b) => b !== victim)!;
      survivorAddress = survivor.address;
      for (const user of await sessionsLostToTheKill(survivor)) lostToTheKill.add(user);
      const takeovers = logged(survivor, 'taking over a rotation');
      const consumed = logged(survivor, 'refresh token consumed by a presentation');
      const total = (f: (s: ModuleStats) => number) => stats.reduce((n, s) => n + f(s), 0);
      const allErrors = stats.flatMap((s) => s.errors);
      const errors = allErrors.filter((e) => !lostToTheKill.has(e.user));
      const unjustified = errors.filter((e) => !e.justified);
      const generations = USERS.map((u) => generationsSeen.get(u)?.size ?? 0);
      console.log(
        `sidecar e2e: ${Date.now() - started} ms, ${total((s) => s.reads)} reads, ` +
          `${total((s) => s.resourceCalls)} resource calls, ${rs.counters.rejected} rejected, ` +
          `${errors.length} sidecar errors (${unjustified.length} while a valid token was cached), ` +
          `generations per user ${generations.join('/')}, IdP refreshes ${oidc.counters.refreshes}, ` +
          `reuses ${oidc.counters.reuses}; sessions lost to the kill ` +
          `${JSON.stringify([...lostToTheKill])} (takeovers ${takeovers}); failover of ${affected.length} sidecars after the kill: ` +
          `${failoverMs.join(', ')} ms`,
      );

      expect(rs.counters.rejected, JSON.stringify(rs.rejections.slice(0, 5))).toBe(0);
      expect(total((s) => s.rejected)).toBe(0);
      expect(oidc.counters.reuses).toBe(0);
      expect(oidc.counters.invalidGrants).toBe(0);
      expect(total((s) => s.staleServed)).toBe(0);
      expect(total((s) => s.backwards)).toBe(0);
      // A lost session's sidecars answer 409 REAUTH_REQUIRED once the survivor took it over;
      // before that only what any user may see once its token is inside the skew.
      for (const e of allErrors.filter((x) => lostToTheKill.has(x.user))) {
        if (e.code === 'REAUTH_REQUIRED') expect(e.startedAt).toBeGreaterThanOrEqual(killedAt);
        else expect(e.leftMs ?? 0, JSON.stringify(e)).toBeLessThanOrEqual(MAX_EFFECTIVE_SKEW_MS);
      }
      // Each lost session was one the survivor took over and found consumed; no other was lost.
      expect(consumed).toBe(lostToTheKill.size);
      expect(takeovers).toBeGreaterThanOrEqual(lostToTheKill.size);
      expect(lostToTheKill.size).toBeLessThan(USERS.length / 2);
      // No module ever saw an error while the token it last got was still servable.
      expect(unjustified, JSON.stringify(unjustified.slice(0, 5))).toEqual([]);
      // Errors at all only around the kill (a rotation the dead replica had claimed), and few.
      expect(errors.length).toBeLessThanOrEqual(Math.max(5, total((s) => s.reads) * 0.02));
      for (const ms of failoverMs) expect(ms).toBeLessThan(5_000);
      // Tokens really rotated underneath: at least one new generation per token lifetime.
      for (const [i, n] of generations.entries())
        if (!lostToTheKill.has(USERS[i]!))
          expect(n).toBeGreaterThanOrEqual(Math.floor(E2E_MS / 5_000));
      expect(total((s) => s.resourceCalls)).toBeGreaterThan(E2E_MS / 100);
      // No token value in any process's output.
      const outputs = [
        ...sidecars.map((s) => s.output()),
        ...brokers.map((b) => JSON.stringify(b.logs)),
      ];
      for (const token of served)
        for (const out of outputs) expect(out.includes(token)).toBe(false);
    },
    E2E_MS + 90_000,
  );

  it('all brokers down longer than a token lives: 503 TOKEN_UNAVAILABLE, never an expired token; recovers when one returns', async () => {
    // Stopped, not killed: a replica killed (-9) in the middle of an IdP call leaves that
    // rotation's outcome unknown, and the session may honestly end REAUTH_REQUIRED (the failover
    // test covers that). This test is about the sidecars while no broker answers, so a session
    // the kill ended is enrolled again first, and every user is probed.
    if (lostToTheKill.size > 0) {
      const client = new BrokerClient(survivorAddress);
      for (const user of lostToTheKill)
        await client.enroll(TENANT, user, (await oidc.mintTokens(user)).refresh_token);
      client.close();
      for (const [i, s] of sidecars.entries())
        for (const user of usersOf(i).filter((u) => lostToTheKill.has(u)))
          await eventually(
            async () => {
              const res = await s.token(TENANT, user, { wait: 2_000 });
              await res.arrayBuffer();
              return res.status === 200;
            },
            15_000,
            `${user} served again once enrolled anew`,
          );
    }
    await Promise.all(brokers.map((b) => b.stop()));
    const downAt = Date.now();
    const probes = sidecars.flatMap((s, i) => usersOf(i).map((user) => ({ s, user })));
    let servedWhileDown = 0;
    let lastRound: number[] = [];
    // Probe for longer than an access token lives.
    while (Date.now() - downAt < AT_TTL_S * 1_000 + 2_000) {
      lastRound = await Promise.all(
        probes.map(async ({ s, user }) => {
          const startedAt = Date.now();
          const res = await s.token(TENANT, user, { wait: 0 });
          if (res.status === 200) {
            const body = (await res.json()) as TokenBody;
            expect(Date.parse(body.expires_at) - startedAt).toBeGreaterThan(EFFECTIVE_SKEW_MS);
            expect(await callResource(body.access_token)).toBe(200);
            servedWhileDown++;
          } else {
            expect(res.status).toBe(503);
            expect(res.headers.get('retry-after')).toMatch(/^\d+$/);
            expect((await errorOf(res)).code).toBe('TOKEN_UNAVAILABLE');
          }
          return res.status;
        }),
      );
      await sleep(250);
    }
    expect(lastRound.every((status) => status === 503)).toBe(true);
    for (const s of sidecars) expect((await readiness(s)).status).toBe(503);

    // One replica comes back on its old address; every sidecar recovers by itself.
    await startBroker(brokerPorts[0]!);
    const backAt = Date.now();
    const recoveryMs = await Promise.all(
      probes.map(async ({ s, user }) => {
        await eventually(
          async () => {
            const res = await s.token(TENANT, user, { wait: 5_000 });
            if (res.status !== 200) {
              await res.arrayBuffer();
              return false;
            }
            const body = (await res.json()) as TokenBody;
            recordToken(user, body);
            return (await callResource(body.access_token)) === 200;
          },
          30_000,
          `a token for ${user} after the broker returned`,
        ).catch(async (err: unknown) => {
          // Say what each side believed, without token values, so a failure can be diagnosed.
          const client = new BrokerClient(brokers.at(-1)!.address);
          const page = await client.list(TENANT, 100).catch(() => undefined);
          client.close();
          const res = await s.token(TENANT, user, { wait: 0 });
          const body = res.status === 200 ? 'a token' : await res.text();
          console.log(
            `recovery of ${user} failed: sidecar ${res.status} ${body}; broker sessions ` +
              JSON.stringify(
                page?.sessions.map((x) => [x.user, x.generation, x.status, x.lastErrorCode]),
              ) +
              `; broker warnings ${JSON.stringify(brokers.at(-1)!.logs.filter((l) => Number(l.level) >= 40)).slice(0, 2000)}`,
          );
          throw err;
        });
        return Date.now() - backAt;
      }),
    );
    for (const s of sidecars)
      await eventually(async () => (await readiness(s)).ready, 10_000, 'ready again');
    console.log(
      `all brokers down: ${servedWhileDown} fresh reads while tokens lasted, then 503; ` +
        `recovery after one came back: max ${Math.max(...recoveryMs)} ms`,
    );
    expect(Math.max(...recoveryMs)).toBeLessThan(15_000);
    expect(rs.counters.rejected).toBe(0);
    expect(oidc.counters.reuses).toBe(0);
  }, 90_000);
});
