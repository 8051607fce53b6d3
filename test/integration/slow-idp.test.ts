import { afterEach, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { startOidcProvider } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes } from '../../scripts/dev/redis-nodes.js';

/**
 * Issue 12, must-show 1: the IdP answers more slowly than TB_IDP_TIMEOUT_MS (but within
 * TB_IDP_ANSWER_WAIT_MS) for longer than a rotation interval. Three broker processes, Redlock over
 * three Redis nodes plus a state node, 50 users with 3-second access tokens (a rotation every
 * ~2.3 s), the real oidc-provider with rotation and reuse detection. No introspection: nothing may
 * rescue a token presented twice. Before the fix every call was aborted at the timeout, the IdP
 * consumed the token anyway and the next attempt presented it again: families revoked.
 */
const USERS = 50;
const TENANT = 'diku';
const SLOW_MS = 10_000;
const LATENCY_MS = 2_500;

let cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
  cleanup = [];
});

describe('a slow IdP, three replicas, 50 users', () => {
  it('waits for answers slower than TB_IDP_TIMEOUT_MS: no reuse, no revoked family', async () => {
    const [oidc, redis] = await Promise.all([
      startOidcProvider({ accessTokenTtlSeconds: 3 }),
      startRedisNodes(4),
    ]);
    cleanup.push(
      () => oidc.close(),
      () => redis.stopAll(),
    );
    const env = brokerEnv(oidc, redisTopology(redis.urls), {
      TB_IDP_TIMEOUT_MS: '1500',
      TB_IDP_ANSWER_WAIT_MS: '8000',
      // A lock shorter than the IdP's latency: only extending it keeps the wait exclusive.
      TB_LOCK_TTL_MS: '2200',
      TB_LOCK_EXTEND_BEFORE_MS: '600',
      TB_LOCK_MARGIN_MS: '100',
      // Introspection off: only waiting for the answer can keep the families alive.
      TB_IDP_INTROSPECTION_ENDPOINT: '',
      TB_IDP_REFRESH_INTROSPECTION: 'off',
      TB_LOG_LEVEL: 'error',
    });
    const brokers: BrokerProcess[] = await Promise.all(
      [1, 2, 3].map(() => startBrokerProcess(env)),
    );
    cleanup.push(async () => {
      await Promise.all(brokers.map((b) => b.kill()));
    });
    const clients = brokers.map((b) => new BrokerClient(b.address));
    cleanup.push(() => Promise.resolve(clients.forEach((c) => c.close())));

    const users = Array.from({ length: USERS }, (_, i) => `user-${i}`);
    await Promise.all(
      users.map(async (user, i) => {
        const minted = await oidc.mintTokens(user);
        await clients[i % clients.length]!.enroll(TENANT, user, minted.refresh_token);
      }),
    );
    const sessions = async () => {
      const all = new Map<string, { status: SessionStatus; generation: number }>();
      let pageToken = '';
      do {
        const page = await clients[0]!.list(TENANT, 100, pageToken);
        for (const s of page.sessions) all.set(s.user, s);
        pageToken = page.nextPageToken;
      } while (pageToken);
      return all;
    };
    const generationSum = async () =>
      [...(await sessions()).values()].reduce((sum, s) => sum + s.generation, 0);

    // Steady state first, then the slow phase: every token-endpoint answer waits 2.5 s after
    // the provider processes it (the request has arrived: the IdP consumes the token).
    await new Promise((r) => setTimeout(r, 3_000));
    oidc.setFault({ kind: 'slow-answer', ms: LATENCY_MS });
    await new Promise((r) => setTimeout(r, SLOW_MS));
    oidc.setFault({ kind: 'none' });
    const afterSlow = await generationSum();
    // Recovery: every session must rotate at least twice more at normal speed.
    await new Promise((r) => setTimeout(r, 6_000));
    oidc.setFault({ kind: 'status', status: 503, retryAfterSeconds: 30 });
    await new Promise((r) => setTimeout(r, 1_500));

    const final = await sessions();
    const presentations = [...oidc.presentations().values()];
    const maxPresentations = Math.max(...presentations);
    const repeated = presentations.filter((n) => n > 1).length;
    const ended = [...final.values()].filter(
      (s) => s.status !== SessionStatus.SESSION_STATUS_ACTIVE,
    ).length;
    const finalSum = [...final.values()].reduce((sum, s) => sum + s.generation, 0);
    console.log(
      `slow IdP (${LATENCY_MS} ms for ${SLOW_MS} ms, timeout 1500 ms): ` +
        `${oidc.counters.refreshRequests} refresh requests, ${oidc.counters.refreshes} refreshes, ` +
        `max presentations per token ${maxPresentations}, tokens presented more than once ${repeated}, ` +
        `reuses ${oidc.counters.reuses}, revoked families ${oidc.counters.revokedGrants}, ` +
        `sessions not ACTIVE ${ended}/${USERS}, generations ${afterSlow} after the slow phase, ${finalSum} at the end`,
    );
    expect(oidc.counters.reuses).toBe(0);
    expect(oidc.counters.revokedGrants).toBe(0);
    expect(maxPresentations).toBe(1);
    expect(ended).toBe(0);
    expect(finalSum - afterSlow).toBeGreaterThanOrEqual(USERS * 2);
    expect(await Promise.all(brokers.map((b) => b.stop()))).toEqual([0, 0, 0]);
  }, 90_000);
});
