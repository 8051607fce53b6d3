import { afterEach, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const TENANT = 'diku';
let cleanup: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  cleanup = [];
});

async function cluster(accessTokenTtlSeconds: number, extra: Record<string, string> = {}) {
  const [oidc, redis]: [OidcProviderHarness, RedisNodes] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds }),
    startRedisNodes(4),
  ]);
  cleanup.push(
    () => oidc.close(),
    () => redis.stopAll(),
  );
  const env = brokerEnv(oidc, redisTopology(redis.urls), extra);
  const brokers: BrokerProcess[] = [];
  const start = async () => {
    const broker = await startBrokerProcess(env);
    brokers.push(broker);
    return broker;
  };
  cleanup.push(() => Promise.all(brokers.map((b) => b.kill())));
  const clients: BrokerClient[] = [];
  const connect = (broker: BrokerProcess) => {
    const client = new BrokerClient(broker.address);
    clients.push(client);
    return client;
  };
  cleanup.push(() => clients.forEach((c) => c.close()));
  return { oidc, env, start, connect };
}

describe('replica failure', () => {
  it.each([
    ['with introspection, it asks the IdP and never presents the orphaned token again', true],
    ['without introspection, it presents it again only after the lock expired', false],
  ])(
    'replica killed (-9) during a slow IdP call: %s',
    async (_title, introspection) => {
      const lockTtlMs = 4_000;
      const { oidc, env, start, connect } = await cluster(30, {
        TB_LOCK_TTL_MS: String(lockTtlMs),
        TB_IDP_TIMEOUT_MS: '2000',
        TB_CLAIM_LEASE_MS: '6000',
        ...(introspection ? {} : { TB_IDP_INTROSPECTION_ENDPOINT: '' }),
      });
      expect(env.TB_LOCK_TTL_MS).toBe(String(lockTtlMs));
      const a = await start();
      const minted = await oidc.mintTokens('alice');
      const enrolled = await connect(a).enroll(TENANT, 'alice', minted.refresh_token);
      expect(enrolled.session?.generation).toBe(1);

      // The next rotation's IdP call hangs; kill the replica while it holds the lock and waits.
      oidc.setFault({ kind: 'delay', ms: 1_500 });
      const arrivedBefore = oidc.tokenRequestsArrived();
      const generationBefore = enrolled.session!.generation;
      void connect(a)
        .refresh(TENANT, 'alice', generationBefore)
        .catch(() => undefined);
      await eventually(() => oidc.tokenRequestsArrived() > arrivedBefore, 5_000, 'IdP call');
      await a.kill();
      const killedAt = Date.now();
      oidc.setFault({ kind: 'none' });

      const b = await start();
      const watcher = connect(b).watch();
      watcher.subscribe(TENANT, 'alice', generationBefore);
      // A clean rotation or REAUTH_REQUIRED: never a silent stall.
      await watcher.until(
        () => watcher.latest(TENANT, 'alice') !== undefined,
        20_000,
        'takeover outcome on the stream',
      );
      const outcome = watcher.latest(TENANT, 'alice')!;
      expect([
        SessionStatus.SESSION_STATUS_ACTIVE,
        SessionStatus.SESSION_STATUS_REAUTH_REQUIRED,
      ]).toContain(outcome.status);
      expect(outcome.generation).toBeGreaterThan(generationBefore);
      if (outcome.status === SessionStatus.SESSION_STATUS_ACTIVE)
        expect(outcome.accessToken.length).toBeGreaterThan(0);

      console.log(
        `takeover outcome: ${SessionStatus[outcome.status]} ${Date.now() - killedAt} ms after the kill`,
      );
      const times = [...oidc.presentationTimes().values()].filter((t) => t.length > 1);
      if (introspection) {
        // Asked first, the broker presents the orphaned token again only if the IdP says it is
        // unused: no token is ever presented twice, whatever the dead replica's call did.
        expect(times).toEqual([]);
        expect(oidc.counters.reuses).toBe(0);
      } else {
        // The RT the dead replica presented was presented again only after its lock expired.
        expect(times.length).toBeLessThanOrEqual(1);
        for (const t of times) expect(t[1]! - t[0]!).toBeGreaterThanOrEqual(lockTtlMs);
        expect(oidc.presentationTimes().size).toBeGreaterThanOrEqual(2);
      }
    },
    60_000,
  );

  it('a watcher that moves to another replica sees generations strictly increasing', async () => {
    const { oidc, start, connect } = await cluster(2);
    const [a, b] = await Promise.all([start(), start()]);
    const users = ['u1', 'u2', 'u3'];
    for (const user of users)
      await connect(a).enroll(TENANT, user, (await oidc.mintTokens(user)).refresh_token);

    const first = connect(a).watch();
    for (const user of users) first.subscribe(TENANT, user);
    await first.until(
      () => users.every((u) => (first.of(TENANT, u).length ?? 0) >= 2),
      15_000,
      'two generations each on replica A',
    );
    // Replica A dies; the watcher resumes on B from the last generation it holds.
    await a.kill();
    await first.until(() => first.ended, 5_000, 'stream end after the kill');
    const second = connect(b).watch();
    for (const user of users)
      second.subscribe(TENANT, user, first.latest(TENANT, user)!.generation);
    await second.until(
      () => users.every((u) => second.of(TENANT, u).length >= 2),
      15_000,
      'two generations each on replica B',
    );
    for (const user of users) {
      const seen = [...first.of(TENANT, user), ...second.of(TENANT, user)].map((e) => e.generation);
      for (let i = 1; i < seen.length; i++) expect(seen[i]!).toBeGreaterThan(seen[i - 1]!);
    }
    expect(oidc.counters.reuses).toBe(0);
  }, 60_000);

  it('SIGTERM ends watch streams so sidecars reconnect, finishes work, and exits 0', async () => {
    const { oidc, start, connect } = await cluster(2);
    const a = await start();
    await connect(a).enroll(TENANT, 'carol', (await oidc.mintTokens('carol')).refresh_token);
    const watcher = connect(a).watch();
    watcher.subscribe(TENANT, 'carol');
    await watcher.until(() => watcher.of(TENANT, 'carol').length >= 2, 10_000);
    const code = await a.stop();
    expect(code).toBe(0);
    await watcher.until(() => watcher.ended, 5_000, 'stream end');
    expect(oidc.counters.reuses).toBe(0);
  }, 30_000);
});
