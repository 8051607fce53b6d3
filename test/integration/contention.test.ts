import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, type Watcher } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../harness/redis-nodes.js';

/**
 * Promises 1 and 4 under contention: three broker replicas (separate processes), Redlock over
 * three Redis nodes plus a state node, 50 users with 3-second access tokens, and clients calling
 * GetToken and Refresh for every user on every replica at once.
 */
const USERS = 50;
const TENANT = 'diku';
const RUN_MS = Number(process.env.TB_CONTENTION_MS ?? 30_000);

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

async function runContention(options: { killLockNodeAt?: number }) {
  const [oidc, redis]: [OidcProviderHarness, RedisNodes] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 3 }),
    startRedisNodes(4),
  ]);
  cleanup.push(
    () => oidc.close(),
    () => redis.stopAll(),
  );
  const env = brokerEnv(oidc, redisTopology(redis.urls), {
    TB_REFRESH_MIN_INTERVAL_MS: '1000',
    TB_LOG_LEVEL: 'error',
  });
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
  const until = Date.now() + RUN_MS;
  let generationsAtKill = 0;
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
  ]);

  // Quiesce: refreshes now fail before reaching the provider's grant logic, so the generation
  // count stops moving while in-flight rotations finish and their events arrive.
  oidc.setFault({ kind: 'status', status: 503, retryAfterSeconds: 30 });
  await new Promise((r) => setTimeout(r, 1_500));
  const finals = new Map<string, number>();
  let pageToken = '';
  do {
    const page = await clients[0]!.list(TENANT, 100, pageToken);
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
  return { oidc, stats, watchers, finals, generations, generationsAtKill, exitCodes };
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
