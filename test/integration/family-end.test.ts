/**
 * Issue 12, item 8: IdPs that end every refresh chain at a session maximum (Keycloak's SSO Session
 * Max, reported in a counting-down `refresh_expires_in`). The session shows the end, the shipped
 * alert (evaluated on the broker's scraped Prometheus samples) fires well before it, and a session
 * enrolled with a login logs in again ahead of it instead of running into invalid_grant. Real
 * oidc-provider and FOLIO emulator, real gRPC with TLS and caller authentication, real Redis.
 */
import { readFileSync } from 'node:fs';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { SessionStatus, type EnrollRequest } from '../../gen/tokenbroker/v1/token_broker.js';
import { startBroker, type RunningBroker } from '../../broker/broker-app.js';
import { loadConfig } from '../../broker/config.js';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import {
  openMetricsEndpoint,
  type MetricsEndpoint,
} from '../../shared/telemetry/metrics-endpoint.js';
import {
  folioBrokerEnv,
  startFolioEmulator,
  type FolioEmulator,
} from '../harness/folio-emulator.js';
import { samples } from '../harness/prometheus-text.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const SESSION_MAX_S = 8;
const silent = pino({ level: 'silent' });

let redis: RedisNodes;
beforeAll(async () => {
  redis = await startRedisNodes(4);
});
afterAll(async () => {
  await redis?.stopAll();
});

/** The shipped family-end alert, as `max(metric{label="value"}) > threshold`. */
function familyEndAlert(): { metric: string; label: string; value: string; threshold: number } {
  const file = parse(
    readFileSync(
      new URL('../../deploy/observability/prometheus-rules.yaml', import.meta.url),
      'utf8',
    ),
  ) as { groups: { rules: { alert: string; expr: string }[] }[] };
  const rule = file.groups
    .flatMap((g) => g.rules)
    .find((r) => r.alert === 'TokenBrokerSessionFamilyEnding');
  // The evaluator below understands this one shape; a rule of another shape must fail here.
  const match = /^max\((tb_[a-z_]+)\{([a-z_]+)="([^"]+)"\}\) > (\d+)$/.exec(
    rule?.expr.trim() ?? '',
  );
  expect(match, rule?.expr).not.toBeNull();
  return { metric: match![1]!, label: match![2]!, value: match![3]!, threshold: Number(match![4]) };
}

/** Evaluates the alert on one scrape of the broker's Prometheus exposition. */
async function alertFires(endpoint: MetricsEndpoint): Promise<{ fires: boolean; value: number }> {
  const alert = familyEndAlert();
  const { body } = await endpoint.exposition();
  const values = samples(body, alert.metric)
    .filter((s) => s.labels[alert.label] === alert.value)
    .map((s) => s.value);
  expect(values.length, `${alert.metric}{${alert.label}="${alert.value}"} is exposed`).toBe(1);
  const value = Math.max(...values);
  return { fires: value > alert.threshold, value };
}

async function startScrapedBroker(
  env: Record<string, string>,
): Promise<{ broker: RunningBroker; endpoint: MetricsEndpoint; client: BrokerClient }> {
  const endpoint = openMetricsEndpoint('broker');
  const broker = await startBroker(loadConfig(env), silent, { meter: endpoint.meter });
  return { broker, endpoint, client: new BrokerClient(`127.0.0.1:${broker.port}`) };
}

const ms = (d: Date | undefined): number => d?.getTime() ?? 0;

describe('a Keycloak-like IdP: every chain ends at the session maximum', () => {
  let oidc: OidcProviderHarness;
  beforeAll(async () => {
    oidc = await startOidcProvider({ accessTokenTtlSeconds: 2, sessionMaxSeconds: SESSION_MAX_S });
  });
  afterAll(async () => {
    await oidc?.close();
  });

  it('shows the end, and the alert fires on scraped samples well before it, then clears', async () => {
    const { broker, endpoint, client } = await startScrapedBroker(
      brokerEnv(oidc, redisTopology(redis.urls)),
    );
    try {
      expect((await alertFires(endpoint)).fires).toBe(false);
      const minted = await oidc.mintTokens('long-import');
      const mintedAt = Date.now();
      const session = (await client.enroll('diku', 'long-import', minted.refresh_token)).session!;
      const end = ms(session.refreshTokenExpiresAt);
      expect(end).toBeGreaterThan(mintedAt + (SESSION_MAX_S - 2) * 1000);
      expect(end).toBeLessThanOrEqual(mintedAt + (SESSION_MAX_S + 1) * 1000);

      const firing = await alertFires(endpoint);
      const firedAt = Date.now();
      expect(firing).toEqual({ fires: true, value: 1 });
      expect(end - firedAt).toBeGreaterThan(4_000);

      // Rotation does not move the end: refresh_expires_in counts down.
      await eventually(
        async () =>
          ((await client.list('diku')).sessions[0]?.generation ?? 0) >= session.generation + 2,
        10_000,
        'two rotations',
      );
      const rotated = (await client.list('diku')).sessions[0]!;
      expect(Math.abs(ms(rotated.refreshTokenExpiresAt) - end)).toBeLessThanOrEqual(1_500);
      expect((await alertFires(endpoint)).fires).toBe(true);

      // At the end the IdP refuses the chain; the session leaves the count and the alert clears.
      await eventually(
        async () =>
          (await client.list('diku')).sessions[0]?.status ===
          SessionStatus.SESSION_STATUS_REAUTH_REQUIRED,
        15_000,
        'the chain to end',
      );
      expect(Date.now()).toBeGreaterThanOrEqual(end - 1_000);
      expect(await alertFires(endpoint)).toEqual({ fires: false, value: 0 });
      expect(oidc.counters.reuses).toBe(0);
    } finally {
      client.close();
      await broker.stop();
      await endpoint.shutdown();
    }
  });
});

describe('a login session behind a session maximum', () => {
  let folio: FolioEmulator;
  beforeAll(async () => {
    folio = await startFolioEmulator({
      tokenExpiration: 'accessToken:2,refreshToken:600',
      familyMaxSeconds: SESSION_MAX_S,
    });
  });
  afterAll(async () => {
    await folio?.close();
  });

  it('logs in again ahead of the end (TB_LOGIN_AHEAD_MS), never hitting invalid_grant', async () => {
    folio.addUser('diku', 'sys-import', 'pw-FAKE-import');
    const { broker, endpoint, client } = await startScrapedBroker(
      folioBrokerEnv(folio, redisTopology(redis.urls), { TB_LOGIN_AHEAD_MS: '4000' }),
    );
    const request: EnrollRequest = {
      tenant: 'diku',
      user: 'sys-import',
      idp: '',
      credential: {
        $case: 'login',
        value: { username: 'sys-import', secret: { $case: 'password', value: 'pw-FAKE-import' } },
      },
    };
    try {
      const enrolledAt = Date.now();
      const session = await new Promise<{ refreshTokenExpiresAt?: Date }>((resolve, reject) =>
        client.raw.enroll(request, (err, res) => (err ? reject(err) : resolve(res.session!))),
      );
      const firstEnd = ms(session.refreshTokenExpiresAt);
      expect(firstEnd).toBeLessThanOrEqual(enrolledAt + (SESSION_MAX_S + 1) * 1000);
      // A login session has a login to fall back on: it is not what the alert counts.
      expect((await alertFires(endpoint)).value).toBe(0);

      await eventually(
        () => folio.familiesOf('diku', 'sys-import') >= 2,
        SESSION_MAX_S * 1000,
        'a login ahead of the family end',
      );
      expect(Date.now()).toBeLessThan(firstEnd);
      const listed = (await client.list('diku')).sessions[0]!;
      expect(listed.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(ms(listed.refreshTokenExpiresAt)).toBeGreaterThan(firstEnd);
      // Past the first family's end: it was never presented late, nothing was refused.
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, firstEnd - Date.now() + 500)));
      const token = (await client.getToken('diku', 'sys-import')).token!;
      expect(token.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(ms(token.expiresAt)).toBeGreaterThan(Date.now());
      expect(folio.counters.refreshRejections).toBe(0);
      expect(folio.counters.reuses).toBe(0);
    } finally {
      client.close();
      await broker.stop();
      await endpoint.shutdown();
    }
  });
});
