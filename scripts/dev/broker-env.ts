import { randomBytes } from 'node:crypto';
import { pino, type Logger } from 'pino';
import { startBroker, type RunningBroker } from '../../broker/broker-app.js';
import { MetricSnapshot } from '../../shared/telemetry/metric-snapshot.js';
import { loadConfig } from '../../broker/config.js';
import { devIdentity } from './dev-identity.js';
import type { OidcProviderHarness } from './oidc-provider.js';

export function sealingKeys(): string {
  return `k1:${randomBytes(32).toString('base64')}`;
}

/** Timings scaled for access tokens that live a few seconds (every test broker uses them). */
export const TEST_TIMINGS: Readonly<Record<string, string>> = {
  TB_IDP_TIMEOUT_MS: '2000',
  TB_LOCK_TTL_MS: '4000',
  TB_LOCK_EXTEND_BEFORE_MS: '1000',
  TB_LOCK_MARGIN_MS: '500',
  TB_LOCK_RETRY_COUNT: '20',
  TB_LOCK_RETRY_DELAY_MS: '50',
  TB_REFRESH_MIN_LEAD_MS: '500',
  TB_RETRY_BASE_MS: '200',
  TB_RETRY_MAX_MS: '2000',
  TB_CLAIM_POLL_MS: '50',
  TB_CLAIM_LEASE_MS: '6000',
  TB_REFRESH_MIN_INTERVAL_MS: '0',
  TB_SHUTDOWN_GRACE_MS: '2000',
  TB_LOG_LEVEL: 'warn',
};

/**
 * Environment for a broker that refreshes against `oidc`, with timings scaled for short-lived
 * test tokens. `redis` is `{ state, locks }`; omitted means embedded mode. TLS and caller
 * authentication are on with the dev cluster's material, as in a cluster (a test that turns them
 * off passes TB_TLS=off / TB_AUTH=off in `extra`, with the file settings blanked).
 */
/** What a broker needs to know of an IdP: its endpoints and the broker's client. */
export type IdpEndpoints = Pick<
  OidcProviderHarness,
  'tokenEndpoint' | 'revocationEndpoint' | 'introspectionEndpoint'
> & { clients: { basic: { clientId: string; clientSecret: string } } };

export function brokerEnv(
  oidc: IdpEndpoints,
  redis?: { state: string; locks: readonly string[]; keys: string; prefix: string },
  extra: Record<string, string> = {},
): Record<string, string> {
  const env: Record<string, string> = {
    TB_GRPC_ADDRESS: '127.0.0.1:0',
    TB_IDP_TOKEN_ENDPOINT: oidc.tokenEndpoint,
    TB_IDP_REVOCATION_ENDPOINT: oidc.revocationEndpoint,
    TB_IDP_INTROSPECTION_ENDPOINT: oidc.introspectionEndpoint,
    TB_IDP_CLIENT_ID: oidc.clients.basic.clientId,
    TB_IDP_CLIENT_SECRET: oidc.clients.basic.clientSecret,
    TB_IDP_AUTH_METHOD: 'client_secret_basic',
    ...devIdentity().brokerEnv(),
    ...TEST_TIMINGS,
    ...extra,
  };
  return withRedis(env, redis);
}

/** Adds a Redis topology to a broker environment; without one the broker runs embedded. */
export function withRedis(
  env: Record<string, string>,
  redis?: { state: string; locks: readonly string[]; keys: string; prefix: string },
): Record<string, string> {
  if (!redis) return env;
  return {
    ...env,
    TB_REDIS_URL: redis.state,
    TB_REDLOCK_URLS: redis.locks.join(','),
    TB_SEALING_KEYS: redis.keys,
    TB_KEY_PREFIX: redis.prefix,
  };
}

/** A broker in this process (real gRPC on port 0). */
export async function startInProcessBroker(
  env: Record<string, string>,
  log: Logger = pino({ level: 'silent' }),
): Promise<RunningBroker & { address: string; metrics: MetricSnapshot }> {
  const metrics = new MetricSnapshot();
  const broker = await startBroker(loadConfig(env), log, { meter: metrics.meter });
  return Object.assign(broker, { address: `127.0.0.1:${broker.port}`, metrics });
}

/**
 * The test topology over started Redis nodes: node 0 holds state, the others are the Redlock
 * nodes; fresh sealing keys and key prefix per call, so tests never see each other's keys.
 */
export function redisTopology(urls: readonly string[]) {
  return {
    state: urls[0]!,
    locks: urls.slice(1),
    keys: sealingKeys(),
    prefix: randomPrefix(),
  };
}

export function randomPrefix(): string {
  return `t${randomBytes(4).toString('hex')}:`;
}
