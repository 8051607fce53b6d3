import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SessionStatus, type Session } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderOptions } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

/**
 * Issue 12, must-show 2 and 3, against the real oidc-provider (rotation and reuse detection),
 * real Redis and real gRPC with TLS and caller authentication on. Each lost answer is a
 * `drop-response`: the provider rotates the token, then resets the connection without answering.
 * - with working introspection: 0 reuses (the consumed token is never presented again);
 * - with a reuse grace period (as Okta, Auth0, Hydra offer): 0 families lost;
 * - with neither: at most one more presentation per lost answer, each visible as
 *   OUTCOME_UNKNOWN_REPRESENTED on the session.
 * And an IdP whose introspection knows only access tokens: logged as unusable, no session ended
 * by it, and one 503 ends no session.
 */
const TENANT = 'diku';
const USERS = 8;
let redis: RedisNodes;

beforeAll(async () => {
  redis = await startRedisNodes(2);
});
afterAll(async () => {
  await redis.stopAll();
});

async function setup(idpOptions: OidcProviderOptions, extra: Record<string, string>) {
  const oidc = await startOidcProvider({ accessTokenTtlSeconds: 60, ...idpOptions });
  const lines: Record<string, unknown>[] = [];
  const log = pino(
    { level: 'info' },
    { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) },
  );
  const broker = await startInProcessBroker(brokerEnv(oidc, redisTopology(redis.urls), extra), log);
  const client = new BrokerClient(broker.address);
  const users = Array.from({ length: USERS }, (_, i) => `user-${i}`);
  const minted: string[] = [];
  for (const user of users) {
    const tokens = await oidc.mintTokens(user);
    minted.push(tokens.refresh_token);
    await client.enroll(TENANT, user, tokens.refresh_token);
  }
  const sessions = async (): Promise<Map<string, Session>> => {
    const page = await client.list(TENANT, 100, '');
    return new Map(page.sessions.map((s) => [s.user, s]));
  };
  /** One lost answer per user: the provider consumes the token and the answer never arrives. */
  const loseOneAnswerEach = async () => {
    for (const user of users) {
      const before = (await sessions()).get(user)!;
      oidc.setFault({ kind: 'drop-response', times: 1 });
      await client.refresh(TENANT, user, before.generation).catch(() => undefined);
    }
    oidc.setFault({ kind: 'none' });
  };
  const close = async () => {
    client.close();
    await broker.stop();
    await oidc.close();
    const text = lines.map((l) => JSON.stringify(l)).join('\n');
    for (const token of minted) expect(text.includes(token)).toBe(false);
  };
  return { oidc, broker, client, users, lines, sessions, loseOneAnswerEach, close };
}

const byStatus = (all: Map<string, Session>, status: SessionStatus) =>
  [...all.values()].filter((s) => s.status === status);

describe('answers lost after the IdP consumed the token', () => {
  it('with working introspection: asked, never presented again, 0 reuses', async () => {
    const t = await setup({}, {});
    try {
      // The probe at the first rotation found introspection usable.
      expect(
        t.lines.some((l) => String(l.msg).includes('introspection knows refresh tokens')),
      ).toBe(true);
      await t.loseOneAnswerEach();
      const all = await t.sessions();
      const presentations = [...t.oidc.presentations().values()];
      console.log(
        `lost answers, introspection: ${USERS} lost, reuses ${t.oidc.counters.reuses}, ` +
          `max presentations ${Math.max(...presentations)}, ` +
          `REAUTH_REQUIRED ${byStatus(all, SessionStatus.SESSION_STATUS_REAUTH_REQUIRED).length}`,
      );
      expect(t.oidc.counters.reuses).toBe(0);
      expect(t.oidc.counters.revokedGrants).toBe(0);
      expect(Math.max(...presentations)).toBe(1);
      // The lost answer held the family's only new token: the session says so, without invalid_grant.
      for (const s of all.values()) {
        expect(s.status).toBe(SessionStatus.SESSION_STATUS_REAUTH_REQUIRED);
        expect(s.lastErrorCode).toBe('IDP_TOKEN_CONSUMED');
      }
      expect(await t.broker.metrics.value('tb_broker_introspections', { result: 'consumed' })).toBe(
        USERS,
      );
    } finally {
      await t.close();
    }
  }, 60_000);

  it('with a reuse grace period: presented again inside it, 0 families lost', async () => {
    const t = await setup(
      { reuseGraceMs: 10_000 },
      {
        TB_IDP_PROFILE: 'hydra',
        TB_IDP_REUSE_GRACE_MS: '10000',
        TB_IDP_REFRESH_INTROSPECTION: 'off',
      },
    );
    try {
      // The start-up line says which semantics are in force.
      const semantics = t.lines.filter((l) => l.msg === 'IdP rotation semantics');
      expect(semantics).toHaveLength(1);
      expect(semantics[0]).toMatchObject({
        idp: 'default',
        profile: 'hydra',
        reuseGraceMs: 10_000,
        refreshIntrospection: 'off',
        sendTimeoutMs: 2_000,
        answerWaitMs: 60_000,
      });
      await t.loseOneAnswerEach();
      const all = await t.sessions();
      console.log(
        `lost answers, grace period: ${USERS} lost, grace replays ${t.oidc.counters.graceReplays}, ` +
          `reuses ${t.oidc.counters.reuses}, revoked families ${t.oidc.counters.revokedGrants}, ` +
          `ACTIVE ${byStatus(all, SessionStatus.SESSION_STATUS_ACTIVE).length}/${USERS}`,
      );
      expect(t.oidc.counters.graceReplays).toBe(USERS);
      expect(t.oidc.counters.reuses).toBe(0);
      expect(t.oidc.counters.revokedGrants).toBe(0);
      expect(t.oidc.counters.introspections).toBe(0);
      for (const s of all.values()) {
        expect(s.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
        expect(s.generation).toBe(2);
        expect(s.lastErrorCode).toBe('');
      }
      // The families are alive: the next rotation of each works.
      for (const user of t.users) await t.client.refresh(TENANT, user, 2);
      for (const s of (await t.sessions()).values()) expect(s.generation).toBe(3);
    } finally {
      await t.close();
    }
  }, 60_000);

  it('with neither: one more presentation per lost answer, each shown as OUTCOME_UNKNOWN_REPRESENTED', async () => {
    const t = await setup(
      {},
      { TB_IDP_INTROSPECTION_ENDPOINT: '', TB_IDP_REFRESH_INTROSPECTION: 'off' },
    );
    try {
      await t.loseOneAnswerEach();
      const all = await t.sessions();
      const presentations = [...t.oidc.presentations().values()];
      const twice = presentations.filter((n) => n === 2).length;
      console.log(
        `lost answers, neither: ${USERS} lost, tokens presented twice ${twice}, ` +
          `max presentations ${Math.max(...presentations)}, reuses ${t.oidc.counters.reuses}`,
      );
      expect(Math.max(...presentations)).toBe(2);
      expect(twice).toBe(USERS);
      for (const s of all.values()) {
        expect(s.status).toBe(SessionStatus.SESSION_STATUS_REAUTH_REQUIRED);
        expect(s.lastErrorCode).toBe('OUTCOME_UNKNOWN_REPRESENTED');
      }
      const said = t.lines.filter((l) => String(l.msg).includes('presenting it again once'));
      expect(said.length).toBe(USERS);
    } finally {
      await t.close();
    }
  }, 60_000);
});

describe('an IdP whose introspection knows only access tokens', () => {
  it('is logged as unusable, ends no session, and one 503 ends no session', async () => {
    const t = await setup({ introspectionKnowsOnlyAccessTokens: true }, {});
    try {
      const unusable = t.lines.filter((l) =>
        String(l.msg).includes('introspection answered active:false'),
      );
      expect(unusable.length).toBe(1);
      expect(unusable[0]!.level).toBe(50);
      expect(
        await t.broker.metrics.value('tb_broker_introspection_unusable', { idp: 'default' }),
      ).toBe(1);
      const asked = t.oidc.counters.introspections;

      // One 503 per user: an answer, so a known outcome; the same token works on the retry.
      for (const user of t.users) {
        const before = (await t.sessions()).get(user)!;
        t.oidc.setFault({ kind: 'status', status: 503, times: 1 });
        await t.client.refresh(TENANT, user, before.generation).catch(() => undefined);
        await t.client.refresh(TENANT, user, before.generation);
      }
      const all = await t.sessions();
      expect(byStatus(all, SessionStatus.SESSION_STATUS_ACTIVE).length).toBe(USERS);
      for (const s of all.values()) expect(s.generation).toBe(2);
      expect(t.oidc.counters.introspections).toBe(asked);
      expect(t.oidc.counters.reuses).toBe(0);
      expect(t.lines.some((l) => String(l.msg).includes('invalid_grant'))).toBe(false);
    } finally {
      await t.close();
    }
  }, 60_000);
});
