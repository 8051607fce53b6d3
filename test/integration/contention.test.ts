import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, type Watcher } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { startOidcProvider } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';
import { startRedisCluster, startRedisSentinel } from '../harness/redis-topologies.js';

/**
 * Promises 1 and 4 under contention: three broker replicas (separate processes), Redlock over
 * three Redis nodes plus a state node, 50 users with 3-second access tokens, and clients calling
 * GetToken and Refresh for every user on every replica at once.
 */
const USERS = 50;
const TENANT = 'diku';
const RUN_MS = Number(process.env.TB_CONTENTION_MS ?? 20_000);

interface LoadStats {
  calls: number;
  refreshCalls: number;
  errors: Map<string, number>;
  expiredServed: number;
}

let cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
  cleanup = [];
});

async function clientLoop(
  client: BrokerClient,
  users: string[],
  until: number,
  stats: LoadStats,
): Promise<void> {
  while (Date.now() < until) {
    const user = users[Math.floor(Math.random() * users.length)]!;
    try {
      stats.calls += 1;
      // The broker answers at some moment between these two; a token it serves must be valid
      // then, so it must not have expired before the request was even sent.
      const sentAt = Date.now();
      const { token } = await client.getToken(TENANT, user);
      if (!token?.accessToken || token.expiresAt!.getTime() <= sentAt) stats.expiredServed += 1;
      if (Math.random() < 0.05) {
        stats.refreshCalls += 1;
        await client.refresh(TENANT, user, token!.generation);
      }
    } catch (err) {
      const code = GrpcStatus[(err as ServiceError).code] ?? 'UNKNOWN';
      stats.errors.set(code, (stats.errors.get(code) ?? 0) + 1);
    }
    await new Promise((r) => setTimeout(r, 15));
  }
}

/**
 * Each watcher's generations per user strictly increase. (Across a state failover a watcher's
 * event subscription reconnects and re-reads, so it may skip generations, never go back.)
 */
function checkWatcherIncreasing(watcher: Watcher, finals: Map<string, number>): void {
  for (const [user, final] of finals) {
    const generations = watcher.of(TENANT, user).map((e) => e.generation);
    expect(generations.length, `watcher saw no event of ${user}`).toBeGreaterThan(0);
    for (let i = 1; i < generations.length; i++)
      expect(generations[i]!, `generations of ${user}`).toBeGreaterThan(generations[i - 1]!);
    expect(generations.at(-1), `last generation of ${user}`).toBe(final);
  }
}

/** Each watcher's generations per user: strictly increasing and without gaps. */
function checkWatcher(watcher: Watcher, finals: Map<string, number>): void {
  for (const [user, final] of finals) {
    const generations = watcher.of(TENANT, user).map((e) => e.generation);
    expect(generations.length, `watcher saw no event of ${user}`).toBeGreaterThan(0);
    const first = generations[0]!;
    const expected = Array.from({ length: final - first + 1 }, (_, i) => first + i);
    expect(generations, `generations of ${user}`).toEqual(expected);
  }
}

/** Where the state lives, and how to kill (-9) its master; Redlock is on 3 more nodes. */
async function stateTopology(shape: 'single' | 'sentinel' | 'cluster') {
  if (shape === 'single') {
    const redis = await startRedisNodes(4);
    cleanup.push(() => redis.stopAll());
    return { redis, env: redisTopology(redis.urls), killMaster: undefined };
  }
  const locks = await startRedisNodes(3);
  cleanup.push(() => locks.stopAll());
  const common = {
    TB_REDLOCK_URLS: locks.urls.join(','),
    TB_SEALING_KEYS: redisTopology(locks.urls).keys,
    TB_KEY_PREFIX: redisTopology(locks.urls).prefix,
  };
  if (shape === 'sentinel') {
    const sentinel = await startRedisSentinel({ replicas: 2, sentinels: 3 });
    cleanup.push(() => sentinel.stopAll());
    return {
      redis: locks,
      extra: {
        ...common,
        TB_REDIS_SENTINELS: sentinel.sentinelList,
        TB_REDIS_SENTINEL_MASTER: sentinel.masterName,
      },
      killMaster: async () => {
        const old = await sentinel.masterPort();
        await sentinel.nodeByPort(old)!.kill();
        const killedAt = Date.now();
        await sentinel.waitForNewMaster(old, 30_000);
        return Date.now() - killedAt;
      },
    };
  }
  const cluster = await startRedisCluster({ masters: 3 });
  cleanup.push(() => cluster.stopAll());
  return {
    redis: locks,
    extra: { ...common, TB_REDIS_CLUSTER_NODES: cluster.nodeList },
    // The promoted master has no replica left, so its shards' commits wait (TB_REDIS_MIN_REPLICAS
    // is 1) until the lost node is back, as a replica; Kubernetes restarts the pod.
    killMaster: async () => {
      const { killedPort, promotionMs } = await cluster.killMasterAndWaitForPromotion(30_000);
      const restartAt = Date.now();
      await cluster.restartAsReplica(killedPort, 30_000);
      console.log(
        `cluster: killed node back as a replica ${Date.now() - restartAt} ms after the promotion`,
      );
      return promotionMs;
    },
  };
}

/**
 * One page of the listing. After a state failover a replica may answer UNAVAILABLE for a moment
 * (its connection moving to the promoted master): ask again, a bounded number of times.
 */
async function listPage(client: BrokerClient, pageToken: string) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await client.list(TENANT, 100, pageToken);
    } catch (err) {
      if ((err as ServiceError).code !== GrpcStatus.UNAVAILABLE || attempt >= 20) throw err;
      console.log(`listing: UNAVAILABLE (${(err as ServiceError).details}), asking again`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

async function runContention(options: {
  killLockNodeAt?: number;
  state?: 'single' | 'sentinel' | 'cluster';
  killStateMasterAt?: number;
  runMs?: number;
}) {
  const [oidc, topology] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 3 }),
    stateTopology(options.state ?? 'single'),
  ]);
  const redis: RedisNodes = topology.redis;
  cleanup.push(() => oidc.close());
  const settings = { TB_REFRESH_MIN_INTERVAL_MS: '1000', TB_LOG_LEVEL: 'error' };
  const env =
    'env' in topology && topology.env
      ? brokerEnv(oidc, topology.env, settings)
      : brokerEnv(oidc, undefined, { ...settings, ...topology.extra });
  const brokers: BrokerProcess[] = await Promise.all([1, 2, 3].map(() => startBrokerProcess(env)));
  cleanup.push(async () => {
    await Promise.all(brokers.map((b) => b.kill()));
  });
  const clients = brokers.map((b) => new BrokerClient(b.address));
  cleanup.push(() => Promise.resolve(clients.forEach((c) => c.close())));

  const users = Array.from({ length: USERS }, (_, i) => `user-${i}`);
  const mintedRefreshTokens: string[] = [];
  await Promise.all(
    users.map(async (user, i) => {
      const minted = await oidc.mintTokens(user);
      mintedRefreshTokens.push(minted.refresh_token);
      await clients[i % clients.length]!.enroll(TENANT, user, minted.refresh_token);
    }),
  );
  const watchers = clients.map((c) => c.watch());
  cleanup.push(() => Promise.resolve(watchers.forEach((w) => w.close())));
  for (const watcher of watchers) for (const user of users) watcher.subscribe(TENANT, user);

  const stats: LoadStats = { calls: 0, refreshCalls: 0, errors: new Map(), expiredServed: 0 };
  const runMs = options.runMs ?? RUN_MS;
  const until = Date.now() + runMs;
  let generationsAtKill = 0;
  // Rotation progress as watcher 0 sees it, sampled: when the total generation last moved.
  const totalSeen = () =>
    users.reduce((sum, user) => sum + (watchers[0]!.latest(TENANT, user)?.generation ?? 0), 0);
  const increases: number[] = [];
  const refreshIncreases: number[] = [];
  let lastTotal = totalSeen();
  let lastRefreshes = oidc.counters.refreshes;
  const sampler = setInterval(() => {
    const total = totalSeen();
    if (total > lastTotal) increases.push(Date.now());
    lastTotal = total;
    if (oidc.counters.refreshes > lastRefreshes) refreshIncreases.push(Date.now());
    lastRefreshes = oidc.counters.refreshes;
  }, 50);
  let masterKilledAt = 0;
  let promotionMs = 0;
  const masterKiller =
    options.killStateMasterAt === undefined || !topology.killMaster
      ? Promise.resolve()
      : (async () => {
          await new Promise((r) => setTimeout(r, options.killStateMasterAt));
          masterKilledAt = Date.now();
          for (const user of users)
            generationsAtKill += watchers[0]!.latest(TENANT, user)?.generation ?? 0;
          promotionMs = await topology.killMaster();
        })();
  const killer =
    options.killLockNodeAt === undefined
      ? Promise.resolve()
      : new Promise<void>((resolve) =>
          setTimeout(() => {
            void redis.nodes[2]!.kill().then(() => {
              for (const user of users)
                generationsAtKill += watchers[0]!.latest(TENANT, user)?.generation ?? 0;
              resolve();
            });
          }, options.killLockNodeAt),
        );
  await Promise.all([
    ...clients.flatMap((client) => [1, 2, 3, 4].map(() => clientLoop(client, users, until, stats))),
    killer,
    masterKiller,
  ]);
  // After a state failover, give rotations a bounded while longer to come back if the run ended
  // first (a full-suite run once saw a 17 s pause): the pause is measured and printed either way,
  // and the test still requires more than 2 rotations per user after the kill.
  if (masterKilledAt > 0) {
    const deadline = Date.now() + 30_000;
    while (totalSeen() - generationsAtKill <= USERS * 2 && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 100));
  }
  clearInterval(sampler);
  // The longest time without any new generation after the master was killed, and when rotations
  // came back after it (relative to the kill).
  const longestGap = (times: number[]) => {
    let gap = 0;
    let endsAt = 0;
    const after = [masterKilledAt, ...times.filter((t) => t > masterKilledAt)];
    for (let i = 1; i < after.length; i++)
      if (after[i]! - after[i - 1]! > gap) {
        gap = after[i]! - after[i - 1]!;
        endsAt = after[i]! - masterKilledAt;
      }
    return { gap, endsAt };
  };
  // IdP refreshes (rotations) and watcher 0's events: the longest pause after the kill.
  const rotationGap = masterKilledAt > 0 ? longestGap(refreshIncreases) : { gap: 0, endsAt: 0 };
  const eventGap = masterKilledAt > 0 ? longestGap(increases) : { gap: 0, endsAt: 0 };
  const stallMs = rotationGap.gap;
  const resumedMs = rotationGap.endsAt;
  const eventStallMs = eventGap.gap;

  // Quiesce: refreshes now fail before reaching the provider's grant logic, so the generation
  // count stops moving while in-flight rotations finish and their events arrive.
  oidc.setFault({ kind: 'status', status: 503, retryAfterSeconds: 30 });
  await new Promise((r) => setTimeout(r, 1_500));
  const finals = new Map<string, number>();
  let pageToken = '';
  do {
    const page = await listPage(clients[0]!, pageToken);
    for (const s of page.sessions) {
      expect(s.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      finals.set(s.user, s.generation);
    }
    pageToken = page.nextPageToken;
  } while (pageToken);
  expect(finals.size).toBe(USERS);
  const generations = [...finals.values()].reduce((a, b) => a + b, 0);

  const exitCodes = await Promise.all(brokers.map((b) => b.stop()));
  // Promise 5: no token value in any log line of any replica.
  const tokens = new Set(mintedRefreshTokens);
  for (const watcher of watchers)
    for (const events of watcher.events.values())
      for (const e of events) if (e.accessToken) tokens.add(e.accessToken);
  const logText = brokers.map((b) => b.logs.map((l) => JSON.stringify(l)).join('\n')).join('\n');
  expect(logText.length).toBeGreaterThan(0);
  const leaked = [...tokens].filter((t) => logText.includes(t)).length;
  expect(leaked, 'token values found in broker logs').toBe(0);
  return {
    oidc,
    stats,
    watchers,
    finals,
    generations,
    generationsAtKill,
    exitCodes,
    failover: { promotionMs, stallMs, resumedMs, eventStallMs },
  };
}

describe('three replicas, three lock nodes, 50 users', () => {
  it(
    'presents every refresh token once and delivers every generation in order',
    async () => {
      const { oidc, stats, watchers, finals, generations, exitCodes } = await runContention({});
      console.log(
        `contention: ${stats.calls} GetToken, ${stats.refreshCalls} Refresh, ` +
          `${oidc.counters.refreshes} IdP refreshes, ${generations} generations, ` +
          `errors ${JSON.stringify(Object.fromEntries(stats.errors))}`,
      );
      expect(oidc.counters.reuses).toBe(0);
      expect(oidc.counters.revokedGrants).toBe(0);
      expect(oidc.counters.invalidGrants).toBe(0);
      expect(oidc.counters.refreshes).toBe(generations);
      expect(Math.max(...oidc.presentations().values())).toBe(1);
      expect(generations).toBeGreaterThan(USERS * 5);
      expect(stats.expiredServed).toBe(0);
      expect(stats.errors.get('FAILED_PRECONDITION') ?? 0).toBe(0);
      for (const watcher of watchers) checkWatcher(watcher, finals);
      expect(exitCodes).toEqual([0, 0, 0]);
    },
    RUN_MS + 60_000,
  );

  it(
    'keeps rotating with one of three lock nodes killed (-9) mid-run',
    async () => {
      const { oidc, stats, watchers, finals, generations, generationsAtKill } = await runContention(
        {
          killLockNodeAt: RUN_MS * 0.4,
        },
      );
      console.log(
        `contention with a lock node killed: ${oidc.counters.refreshes} IdP refreshes, ` +
          `${generations} generations (${generationsAtKill} at the kill), errors ${JSON.stringify(Object.fromEntries(stats.errors))}`,
      );
      expect(oidc.counters.reuses).toBe(0);
      expect(oidc.counters.revokedGrants).toBe(0);
      expect(oidc.counters.refreshes).toBe(generations);
      expect(Math.max(...oidc.presentations().values())).toBe(1);
      // Rotations went on after the kill: at least three more per user in the remaining time.
      expect(generationsAtKill).toBeGreaterThan(0);
      expect(generations - generationsAtKill).toBeGreaterThan(USERS * 3);
      expect(stats.expiredServed).toBe(0);
      for (const watcher of watchers) checkWatcher(watcher, finals);
    },
    RUN_MS + 60_000,
  );
});

/**
 * Issue 14, must-show 1 and 2: the same load while the STATE store's master is killed (-9) and a
 * replica promoted. Commits wait for a replica (TB_REDIS_MIN_REPLICAS defaults to 1 here), so no
 * rotation is lost: 0 reuses at the IdP, every IdP refresh is a stored generation, no session
 * lost, every watcher's generations increase.
 */
describe.each([['sentinel' as const], ['cluster' as const]])(
  'three replicas, 50 users, state on Redis %s',
  (state) => {
    const runMs = Math.min(RUN_MS, 20_000);
    it(
      'keeps every rotation when the state master is killed (-9) mid-run',
      async () => {
        const { oidc, stats, watchers, finals, generations, generationsAtKill, failover } =
          await runContention({ state, killStateMasterAt: runMs * 0.3, runMs });
        console.log(
          `${state}: master killed at ${runMs * 0.3} ms; promotion ${failover.promotionMs} ms, ` +
            `longest pause of IdP refreshes after the kill ${failover.stallMs} ms (ended ` +
            `${failover.resumedMs} ms after the kill), longest pause of watcher events ` +
            `${failover.eventStallMs} ms; ${oidc.counters.refreshes} IdP refreshes, ` +
            `${generations} generations (${generationsAtKill} at the kill), reuses ` +
            `${oidc.counters.reuses}, sessions ${finals.size}/${USERS}, ` +
            `errors ${JSON.stringify(Object.fromEntries(stats.errors))}`,
        );
        expect(oidc.counters.reuses).toBe(0);
        expect(oidc.counters.revokedGrants).toBe(0);
        expect(oidc.counters.invalidGrants).toBe(0);
        // No rotation lost: each refresh the IdP answered is a stored generation.
        expect(oidc.counters.refreshes).toBe(generations);
        expect(Math.max(...oidc.presentations().values())).toBe(1);
        expect(finals.size).toBe(USERS);
        expect(generationsAtKill).toBeGreaterThan(0);
        expect(generations - generationsAtKill).toBeGreaterThan(USERS * 2);
        for (const watcher of watchers) checkWatcherIncreasing(watcher, finals);
      },
      runMs + 90_000,
    );
  },
);
