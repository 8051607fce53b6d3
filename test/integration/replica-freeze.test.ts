/**
 * Issue 12 (4, 5, 7) and issue 14 (3) with real processes: 3 broker replicas, 6 sidecars, real
 * Redis, a real oidc-provider issuing 6-second access tokens; TLS and caller authentication on.
 * - A replica SIGSTOPped for 10 s costs no read: every answer is 200 while a valid token exists
 *   at a healthy replica, and after SIGCONT no refresh token was presented twice.
 * - 6-second tokens are served with the default 10 s skew (shrunk, with a warning).
 * - After a replica is killed and comes back, streams spread over it again once connections
 *   reach their (short) maximum age.
 * - After the state Redis loses everything and users are enrolled again, the sidecars (holding
 *   a higher generation of the old epoch) serve the new epoch's first token at once.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { freePort } from '../../scripts/dev/free-port.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import {
  startSidecarProcess,
  type SidecarProcess,
  type TokenBody,
} from '../../scripts/dev/sidecar-process.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const TENANT = 'diku';
const USERS = ['u0', 'u1', 'u2'];
const SIDECARS = 6;
const AT_TTL_S = 6;
/** A quarter of the 6 s lifetime: the skew the sidecars shrink their default 10 s to. */
const EFFECTIVE_SKEW_MS = 1_500;
const FREEZE_MS = 10_000;

let cleanup: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  cleanup = [];
});

/**
 * Rotation at half the 6 s lifetime, and a claim lease just above the test lock TTL (4 s), so a
 * frozen replica's claim comes back soon. (A 1 s IdP timeout would be too short on a busy
 * 2-core machine: an aborted refresh is the slow-IdP loss of issue 12.1, not this test's.)
 */
const SHORT_TOKEN_TIMINGS = {
  TB_REFRESH_RATIO: '0.5',
  TB_CLAIM_LEASE_MS: '4500',
};

async function cluster(extra: Record<string, string> = {}) {
  const [oidc, redis]: [OidcProviderHarness, RedisNodes] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: AT_TTL_S }),
    startRedisNodes(4),
  ]);
  cleanup.push(
    () => oidc.close(),
    () => redis.stopAll(),
  );
  const env = brokerEnv(oidc, redisTopology(redis.urls), { ...SHORT_TOKEN_TIMINGS, ...extra });
  const ports = await Promise.all([freePort(), freePort(), freePort()]);
  const brokers: (BrokerProcess | undefined)[] = [];
  const start = async (i: number) => {
    brokers[i] = await startBrokerProcess({ ...env, TB_GRPC_ADDRESS: `127.0.0.1:${ports[i]}` });
    return brokers[i];
  };
  cleanup.push(() =>
    Promise.all(
      brokers.map(async (b) => {
        if (!b) return;
        // A broker left frozen by a failed test must be woken to be killed cleanly.
        process.kill(b.pid, 'SIGCONT');
        await b.kill();
      }),
    ),
  );
  await Promise.all(ports.map((_, i) => start(i)));
  const clients: BrokerClient[] = [];
  const connect = (i: number) => {
    const client = new BrokerClient(`127.0.0.1:${ports[i]}`);
    clients.push(client);
    return client;
  };
  cleanup.push(() => clients.forEach((c) => c.close()));
  const enrollAll = async () => {
    for (const user of USERS)
      await connect(0).enroll(TENANT, user, (await oidc.mintTokens(user)).refresh_token);
  };
  await enrollAll();
  const sidecars: SidecarProcess[] = await Promise.all(
    Array.from({ length: SIDECARS }, (_, i) =>
      startSidecarProcess({
        TB_SIDECAR_BROKER_ADDRESS: `ipv4:${ports.map((p) => `127.0.0.1:${p}`).join(',')}`,
        // The default skew (10 s) is left as it is: larger than the tokens' whole life.
        TB_SIDECAR_USERS: `${TENANT}/${USERS[i % USERS.length]}`,
        TB_SIDECAR_RECONNECT_MAX_MS: '1000',
      }),
    ),
  );
  cleanup.push(() => Promise.all(sidecars.map((s) => s.kill())));
  let readiness: string[] = [];
  await eventually(
    async () => {
      const answers = await Promise.all(sidecars.map((s) => s.get('/readyz')));
      readiness = await Promise.all(answers.map((r) => r.text()));
      return answers.every((r) => r.ok);
    },
    20_000,
    'every sidecar ready',
  ).catch((err: Error) => {
    throw new Error(`${err.message}: ${readiness.join(' ')}`);
  });
  return { oidc, redis, ports, brokers, start, connect, sidecars, enrollAll };
}

/** The broker ports each sidecar's streams run on (from /readyz). */
async function streamPorts(sidecars: SidecarProcess[]): Promise<number[][]> {
  return Promise.all(
    sidecars.map(async (s) => {
      const body = (await (await s.get('/readyz')).json()) as {
        broker: { peer: string | null; peers?: string[] };
      };
      const peers = body.broker.peers ?? (body.broker.peer ? [body.broker.peer] : []);
      return peers.map((p) => Number(/:(\d+)$/.exec(p)?.[1]));
    }),
  );
}

function countBy(ports: number[][], all: number[]): Map<number, number> {
  const counts = new Map(all.map((p) => [p, 0]));
  for (const list of ports) for (const p of list) counts.set(p, (counts.get(p) ?? 0) + 1);
  return counts;
}

describe('sidecars across replicas', () => {
  it('a replica frozen 10 s costs no read; 6-second tokens are served; no reuse after', async () => {
    const { oidc, ports, brokers, connect, sidecars } = await cluster();
    // Every sidecar holds two streams, on two distinct replicas.
    await eventually(
      async () => (await streamPorts(sidecars)).every((p) => p.length === 2 && p[0] !== p[1]),
      20_000,
      'two streams on distinct replicas in every sidecar',
    );
    // Freeze the replica most streams run on.
    const counts = countBy(await streamPorts(sidecars), ports);
    const frozen = ports.indexOf([...counts.entries()].sort((a, b) => b[1] - a[1])[0]![0]);
    const healthy = connect((frozen + 1) % ports.length);

    // The newest expiry a healthy replica knows per user: "a valid token exists somewhere".
    const newestExpiry = new Map<string, number>();
    let polling = true;
    const poller = (async () => {
      while (polling) {
        await Promise.all(
          USERS.map(async (user) => {
            const token = (await healthy.getToken(TENANT, user).catch(() => undefined))?.token;
            const at = token?.expiresAt?.getTime() ?? 0;
            if (at > (newestExpiry.get(user) ?? 0)) newestExpiry.set(user, at);
          }),
        );
        await new Promise((r) => setTimeout(r, 200));
      }
    })();

    const failures: { at: number; status: number; code: string; justified: boolean }[] = [];
    let reads = 0;
    let maxLatencyMs = 0;
    let reading = true;
    const readers = sidecars.map(async (sidecar, i) => {
      const user = USERS[i % USERS.length]!;
      while (reading) {
        const started = Date.now();
        const res = await sidecar.token(TENANT, user, { wait: 2_000 });
        const latency = Date.now() - started;
        maxLatencyMs = Math.max(maxLatencyMs, latency);
        reads++;
        if (res.status !== 200) {
          const body = (await res.json()) as { error?: { code?: string } };
          // Unjustified when a healthy replica held a token valid past the skew at that time.
          const justified = (newestExpiry.get(user) ?? 0) - started <= EFFECTIVE_SKEW_MS + 250;
          failures.push({
            at: started,
            status: res.status,
            code: body.error?.code ?? '',
            justified,
          });
        } else {
          const body = (await res.json()) as TokenBody;
          expect(Date.parse(body.expires_at)).toBeGreaterThan(Date.now());
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    });

    await new Promise((r) => setTimeout(r, 1_000));
    const frozenAt = Date.now();
    process.kill(brokers[frozen]!.pid, 'SIGSTOP');
    await new Promise((r) => setTimeout(r, FREEZE_MS));
    process.kill(brokers[frozen]!.pid, 'SIGCONT');
    // Reads go on past the thaw: the replica's stale view must not be served either.
    await new Promise((r) => setTimeout(r, 4_000));
    reading = false;
    await Promise.all(readers);
    polling = false;
    await poller;

    const unjustified = failures.filter((f) => !f.justified);
    console.log(
      `frozen replica ${frozen} (${counts.get(ports[frozen]!)} of ${[...counts.values()].reduce((a, b) => a + b, 0)} streams) for ${FREEZE_MS} ms: ` +
        `${reads} reads, ${failures.length} not 200 (${unjustified.length} while a valid token existed), ` +
        `max read latency ${maxLatencyMs} ms; failures at +ms: ${JSON.stringify(failures.map((f) => [f.at - frozenAt, f.status, f.code]))}`,
    );
    expect(reads).toBeGreaterThan(SIDECARS * 20);
    expect(unjustified).toEqual([]);
    // After SIGCONT: no refresh token reached the IdP twice.
    expect(oidc.counters.reuses).toBe(0);
    expect([...oidc.presentations().values()].filter((n) => n > 1)).toEqual([]);
    // 12.7: the tokens live 6 s, below the default 10 s skew; each sidecar said it shrank it to
    // a quarter of the lifetime. That lifetime runs from the broker's receipt of the token to its
    // exp (whole seconds, so up to a second either way), and an IdP slow to answer on a loaded
    // machine makes it shorter still: the relation is checked, not a fixed floor.
    for (const sidecar of sidecars) {
      const shrunk = sidecar.logs.filter((l) => typeof l.skewMs === 'number');
      expect(
        shrunk.some(
          (l) =>
            typeof l.lifetimeMs === 'number' &&
            l.lifetimeMs <= (AT_TTL_S + 1) * 1_000 &&
            l.lifetimeMs > AT_TTL_S * 500 &&
            l.skewMs === Math.floor(l.lifetimeMs / 4) &&
            l.skewMs <= EFFECTIVE_SKEW_MS,
        ),
        JSON.stringify(shrunk.map((l) => [l.lifetimeMs, l.skewMs, l.configuredSkewMs])),
      ).toBe(true);
    }
    for (const sidecar of sidecars) expect(sidecar.output()).not.toMatch(/"access_token"/);
  }, 120_000);

  it('streams spread again after a replica returns; a new epoch is served at once', async () => {
    const { ports, brokers, start, sidecars, redis, enrollAll } = await cluster({
      TB_GRPC_MAX_CONNECTION_AGE_MS: '3000',
      TB_GRPC_MAX_CONNECTION_AGE_GRACE_MS: '1000',
    });
    await brokers[2]!.kill();
    await eventually(
      async () => (await streamPorts(sidecars)).every((p) => p.length > 0 && !p.includes(ports[2])),
      20_000,
      'all streams on the two survivors',
    );
    await start(2);
    let last = new Map<number, number>();
    // With connections aged out every ~3 s, streams come back to the restarted replica.
    await eventually(
      async () => {
        last = countBy(await streamPorts(sidecars), ports);
        const total = [...last.values()].reduce((a, b) => a + b, 0);
        // Nearly every stream known (one or two may be reopening as their connection ages out).
        return (
          total >= 2 * SIDECARS - 2 &&
          (last.get(ports[2]) ?? 0) >= 2 &&
          [...last.values()].every((n) => n <= total / 2)
        );
      },
      30_000,
      'streams spread over the restarted replica',
    );
    console.log(`streams per replica after the restart: ${JSON.stringify([...last.values()])}`);

    // Issue 14.3: the state Redis loses everything; users are enrolled again (new epochs).
    // What each sidecar holds now (a read may still wait out a stream being moved on a busy
    // machine: the freeze test above is the one that counts answers).
    const held = await Promise.all(
      sidecars.map(async (s, i) => {
        let generation = 0;
        await eventually(
          async () => {
            const res = await s.token(TENANT, USERS[i % USERS.length]!);
            if (!res.ok) return false;
            generation = ((await res.json()) as TokenBody).generation;
            return true;
          },
          10_000,
          `sidecar ${i} serving before the state loss`,
        );
        return generation;
      }),
    );
    expect(Math.min(...held)).toBeGreaterThan(1);
    await redis.nodes[0]!.restart();
    await eventually(
      async () => {
        try {
          await enrollAll();
          return true;
        } catch {
          return false;
        }
      },
      15_000,
      'enrollment on the fresh state store',
    );
    const enrolledAt = Date.now();
    await Promise.all(
      sidecars.map((s, i) =>
        eventually(
          async () => {
            const res = await s.token(TENANT, USERS[i % USERS.length]!, { wait: 0 });
            if (!res.ok) return false;
            const body = (await res.json()) as TokenBody;
            return body.generation < held[i]!;
          },
          10_000,
          `sidecar ${i} serving the new epoch`,
        ),
      ),
    );
    console.log(
      `new epoch served by every sidecar ${Date.now() - enrolledAt} ms after re-enrollment (held generations ${JSON.stringify(held)})`,
    );
  }, 150_000);
});
