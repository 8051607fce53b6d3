import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { ConfigError } from './errors.js';

/**
 * The broker's configuration, read once from environment variables and validated at start-up.
 * Every error names the exact variable. README.md lists each variable with its default.
 */
export interface IdpConfig {
  name: string;
  issuer: string | undefined;
  tokenEndpoint: string | undefined;
  revocationEndpoint: string | undefined;
  clientId: string;
  clientSecret: string | undefined;
  authMethod: 'client_secret_basic' | 'client_secret_post' | 'none';
  scope: string | undefined;
  timeoutMs: number;
}

export interface BrokerConfig {
  grpcAddress: string;
  replicaId: string;
  logLevel: string;
  /** State store; undefined selects embedded mode (memory, one replica). */
  redisUrl: string | undefined;
  redlockUrls: string[];
  keyPrefix: string;
  sealingKeysText: string | undefined;
  sealingKeysSetting: string;
  idp: IdpConfig;
  rotation: {
    ratio: number;
    jitterRatio: number;
    minLeadMs: number;
    retryBaseMs: number;
    retryMaxMs: number;
  };
  lock: {
    ttlMs: number;
    extendBeforeMs: number;
    marginMs: number;
    retryCount: number;
    retryDelayMs: number;
  };
  worker: { pollIntervalMs: number; batchSize: number; concurrency: number; claimLeaseMs: number };
  sessionIdleTimeoutMs: number;
  refreshMinIntervalMs: number;
  refreshWaitMs: number;
  persistRetryMs: number;
  shutdownGraceMs: number;
}

type Env = Record<string, string | undefined>;

export function loadConfig(env: Env = process.env): BrokerConfig {
  const read = new EnvReader(env);
  const redisUrl = read.url('TB_REDIS_URL', ['redis:', 'rediss:']);
  const redlockUrls = read.list('TB_REDLOCK_URLS');
  for (const [i, url] of redlockUrls.entries())
    checkUrl(`TB_REDLOCK_URLS[${i}]`, url, ['redis:', 'rediss:']);
  if (redlockUrls.length > 0 && !redisUrl)
    throw new ConfigError('TB_REDLOCK_URLS', 'needs TB_REDIS_URL (the state store) as well');

  const sealingFile = read.string('TB_SEALING_KEYS_FILE');
  let sealingKeysText = read.string('TB_SEALING_KEYS');
  let sealingKeysSetting = 'TB_SEALING_KEYS';
  if (sealingFile) {
    if (sealingKeysText)
      throw new ConfigError('TB_SEALING_KEYS_FILE', 'and TB_SEALING_KEYS are exclusive: set one');
    try {
      sealingKeysText = readFileSync(sealingFile, 'utf8');
    } catch (err) {
      throw new ConfigError('TB_SEALING_KEYS_FILE', `cannot be read: ${(err as Error).message}`);
    }
    sealingKeysSetting = 'TB_SEALING_KEYS_FILE';
  }
  if (redisUrl && !sealingKeysText)
    throw new ConfigError(
      'TB_SEALING_KEYS',
      'is required with TB_REDIS_URL: state at rest is sealed (format kid:base64-32-bytes)',
    );

  const issuer = read.url('TB_IDP_ISSUER', ['http:', 'https:']);
  const tokenEndpoint = read.url('TB_IDP_TOKEN_ENDPOINT', ['http:', 'https:']);
  if (!issuer && !tokenEndpoint)
    throw new ConfigError('TB_IDP_TOKEN_ENDPOINT', 'or TB_IDP_ISSUER (OIDC discovery) is required');
  const secretFile = read.string('TB_IDP_CLIENT_SECRET_FILE');
  let clientSecret = read.string('TB_IDP_CLIENT_SECRET');
  if (secretFile) {
    try {
      clientSecret = readFileSync(secretFile, 'utf8').trim();
    } catch (err) {
      throw new ConfigError(
        'TB_IDP_CLIENT_SECRET_FILE',
        `cannot be read: ${(err as Error).message}`,
      );
    }
  }
  const authMethod = read.oneOf(
    'TB_IDP_AUTH_METHOD',
    ['client_secret_basic', 'client_secret_post', 'none'] as const,
    'client_secret_basic',
  );
  if (authMethod !== 'none' && !clientSecret)
    throw new ConfigError(
      'TB_IDP_CLIENT_SECRET',
      `is required with TB_IDP_AUTH_METHOD=${authMethod} (or set TB_IDP_CLIENT_SECRET_FILE)`,
    );
  const idpTimeoutMs = read.int('TB_IDP_TIMEOUT_MS', 5_000, 100);

  const lockTtlMs = read.int('TB_LOCK_TTL_MS', 15_000, 1_000);
  const extendBeforeMs = read.int('TB_LOCK_EXTEND_BEFORE_MS', Math.round(lockTtlMs / 3), 100);
  const marginMs = read.int('TB_LOCK_MARGIN_MS', 1_000, 0);
  if (extendBeforeMs > lockTtlMs - 100)
    throw new ConfigError('TB_LOCK_EXTEND_BEFORE_MS', `must be at most TB_LOCK_TTL_MS - 100`);
  // The IdP call must end, or be aborted, before the lock could lapse even without extension.
  if (idpTimeoutMs + marginMs > lockTtlMs - extendBeforeMs)
    throw new ConfigError(
      'TB_IDP_TIMEOUT_MS',
      `(${idpTimeoutMs}) plus TB_LOCK_MARGIN_MS (${marginMs}) must fit in TB_LOCK_TTL_MS - TB_LOCK_EXTEND_BEFORE_MS (${lockTtlMs - extendBeforeMs})`,
    );

  const config: BrokerConfig = {
    grpcAddress: read.string('TB_GRPC_ADDRESS') ?? '0.0.0.0:50051',
    replicaId: read.string('TB_REPLICA_ID') ?? `${hostname()}-${process.pid}`,
    logLevel: read.oneOf(
      'TB_LOG_LEVEL',
      ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const,
      'info',
    ),
    redisUrl,
    redlockUrls: redlockUrls.length > 0 ? redlockUrls : redisUrl ? [redisUrl] : [],
    keyPrefix: read.string('TB_KEY_PREFIX') ?? 'tb:',
    sealingKeysText,
    sealingKeysSetting,
    idp: {
      name: read.string('TB_IDP_NAME') ?? 'default',
      issuer,
      tokenEndpoint,
      revocationEndpoint: read.url('TB_IDP_REVOCATION_ENDPOINT', ['http:', 'https:']),
      clientId: read.required('TB_IDP_CLIENT_ID'),
      clientSecret,
      authMethod,
      scope: read.string('TB_IDP_SCOPE'),
      timeoutMs: idpTimeoutMs,
    },
    rotation: {
      ratio: read.number('TB_REFRESH_RATIO', 0.75),
      jitterRatio: read.number('TB_REFRESH_JITTER_RATIO', 0.05),
      minLeadMs: read.int('TB_REFRESH_MIN_LEAD_MS', 10_000, 0),
      retryBaseMs: read.int('TB_RETRY_BASE_MS', 500, 10),
      retryMaxMs: read.int('TB_RETRY_MAX_MS', 30_000, 10),
    },
    lock: {
      ttlMs: lockTtlMs,
      extendBeforeMs,
      marginMs,
      retryCount: read.int('TB_LOCK_RETRY_COUNT', 3, 0),
      retryDelayMs: read.int('TB_LOCK_RETRY_DELAY_MS', 150, 10),
    },
    worker: {
      pollIntervalMs: read.int('TB_CLAIM_POLL_MS', 250, 10),
      batchSize: read.int('TB_CLAIM_BATCH', 32, 1),
      concurrency: read.int('TB_ROTATION_CONCURRENCY', 32, 1),
      claimLeaseMs: read.int('TB_CLAIM_LEASE_MS', lockTtlMs * 2, 1_000),
    },
    sessionIdleTimeoutMs: read.int('TB_SESSION_IDLE_TIMEOUT_MS', 3_600_000, 1_000),
    refreshMinIntervalMs: read.int('TB_REFRESH_MIN_INTERVAL_MS', 1_000, 0),
    refreshWaitMs: read.int('TB_REFRESH_WAIT_MS', 10_000, 100),
    persistRetryMs: read.int('TB_PERSIST_RETRY_MS', 30_000, 0),
    shutdownGraceMs: read.int('TB_SHUTDOWN_GRACE_MS', 20_000, 0),
  };
  if (config.worker.claimLeaseMs <= lockTtlMs)
    throw new ConfigError('TB_CLAIM_LEASE_MS', `must exceed TB_LOCK_TTL_MS (${lockTtlMs})`);
  return config;
}

function checkUrl(setting: string, value: string, protocols: string[]): void {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigError(setting, `must be a URL, got ${JSON.stringify(redactUrl(value))}`);
  }
  if (!protocols.includes(url.protocol))
    throw new ConfigError(setting, `must be a ${protocols.join(' or ')} URL, got ${url.protocol}`);
}

/**
 * Hides a password in a URL-ish string before it goes into an error. Everything up to the last
 * '@' goes: an unparseable URL often holds a password with an unencoded '/' or '@'.
 */
function redactUrl(value: string): string {
  return value.replace(/\/\/[^]*@/, '//***@');
}

class EnvReader {
  constructor(private readonly env: Env) {}

  string(name: string): string | undefined {
    const value = this.env[name]?.trim();
    return value ? value : undefined;
  }

  required(name: string): string {
    const value = this.string(name);
    if (!value) throw new ConfigError(name, 'is required');
    return value;
  }

  list(name: string): string[] {
    return (this.string(name) ?? '')
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
  }

  url(name: string, protocols: string[]): string | undefined {
    const value = this.string(name);
    if (value) checkUrl(name, value, protocols);
    return value;
  }

  number(name: string, fallback: number): number {
    const raw = this.string(name);
    if (raw === undefined) return fallback;
    const value = Number(raw);
    if (!Number.isFinite(value))
      throw new ConfigError(name, `must be a number, got ${JSON.stringify(raw)}`);
    return value;
  }

  int(name: string, fallback: number, min: number): number {
    const raw = this.string(name);
    if (raw === undefined) return fallback;
    if (!/^\d+$/.test(raw))
      throw new ConfigError(
        name,
        `must be a whole number of milliseconds or a count, got ${JSON.stringify(raw)}`,
      );
    const value = Number(raw);
    if (value < min) throw new ConfigError(name, `must be at least ${min}, got ${value}`);
    return value;
  }

  oneOf<T extends string>(name: string, allowed: readonly T[], fallback: T): T {
    const raw = this.string(name);
    if (raw === undefined) return fallback;
    if (!(allowed as readonly string[]).includes(raw))
      throw new ConfigError(
        name,
        `must be one of ${allowed.join(', ')}, got ${JSON.stringify(raw)}`,
      );
    return raw as T;
  }
}
