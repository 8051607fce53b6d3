import { readFileSync, statSync } from 'node:fs';
import { hostname } from 'node:os';
import { checkUrl as checkUrlWith, EnvReader, type Env } from '../shared/env-reader.js';
import { ConfigError } from './errors.js';
import {
  IDP_PROFILES,
  PROFILES,
  REFRESH_INTROSPECTION_MODES,
  type IdpProfileName,
  type RefreshIntrospection,
} from './idp/idp-profiles.js';
import { DEFAULT_ROTATION_POLICY, type RotationPolicyOptions } from './rotation/rotation-policy.js';

const configError = (setting: string, problem: string) => new ConfigError(setting, problem);

function checkUrl(setting: string, value: string, protocols: string[]): void {
  checkUrlWith(setting, value, protocols, configError);
}

function reader(env: Env): EnvReader {
  return new EnvReader(env, configError);
}

/**
 * The broker's configuration, read once from environment variables and validated at start-up.
 * Every error names the exact variable. README.md lists each variable with its default.
 */
export type IdpType = 'oauth2' | 'folio';
export const IDP_TYPES: readonly IdpType[] = ['oauth2', 'folio'];

/**
 * One identity provider. `oauth2` uses the endpoint and client fields; `folio` only `folioUrl`
 * (its client fields stay empty).
 */
export interface IdpConfig {
  name: string;
  type: IdpType;
  /** folio: the Okapi or Kong gateway's base URL. */
  folioUrl: string | undefined;
  issuer: string | undefined;
  tokenEndpoint: string | undefined;
  revocationEndpoint: string | undefined;
  introspectionEndpoint: string | undefined;
  clientId: string;
  clientSecret: string | undefined;
  authMethod: 'client_secret_basic' | 'client_secret_post' | 'none';
  scope: string | undefined;
  /** oauth2: RFC 8693 requested_token_type of exchange enrollments; undefined: refresh token. */
  exchangeTokenType: string | undefined;
  /** Bounds connecting and sending a request (TB_IDP_TIMEOUT_MS). */
  timeoutMs: number;
  /** Bounds waiting for the answer to a sent token request (TB_IDP_ANSWER_WAIT_MS). */
  answerWaitMs: number;
  /** The preset of rotation semantics (TB_IDP_PROFILE). */
  profile: IdpProfileName;
  /** Inside this long after a presentation, presenting the same token again is safe (0: never). */
  reuseGraceMs: number;
  /** Whether introspection may be asked about refresh tokens (after a successful probe). */
  refreshIntrospection: RefreshIntrospection;
}

/** TLS on the gRPC listener; the files are re-read when they change. */
export interface TlsConfig {
  certFile: string;
  keyFile: string;
  /** When set, client certificates are required and verified against this CA bundle. */
  clientCaFile: string | undefined;
}

/** Caller authentication (projected ServiceAccount tokens) and the access policy. */
export interface AuthConfig {
  issuer: string;
  audience: string;
  /** true: keys from the issuer's OIDC discovery; false: from `jwksFile`. */
  discovery: boolean;
  jwksFile: string | undefined;
  issuerCaFile: string | undefined;
  issuerTokenFile: string | undefined;
  policyFile: string;
}

export interface RedisAddress {
  host: string;
  port: number;
}

/** TLS towards Redis nodes given as host:port (Sentinel, Cluster); a URL says it with rediss:. */
export interface RedisTls {
  /** PEM bundle of the CAs that sign the Redis nodes' certificates; undefined: system CAs. */
  ca: string | undefined;
}

/** Where the state lives: one Redis, a Sentinel-monitored master, or a Redis Cluster. */
export type StateStoreConfig =
  | { kind: 'single'; url: string }
  | {
      kind: 'sentinel';
      sentinels: RedisAddress[];
      master: string;
      password: string | undefined;
      sentinelPassword: string | undefined;
      tls: RedisTls | undefined;
    }
  | {
      kind: 'cluster';
      nodes: RedisAddress[];
      password: string | undefined;
      tls: RedisTls | undefined;
    };

export interface BrokerConfig {
  grpcAddress: string;
  /** undefined: plaintext (embedded mode without certificates, or TB_TLS=off). */
  tls: TlsConfig | undefined;
  /** undefined: TB_AUTH=off, every caller may do anything. */
  auth: AuthConfig | undefined;
  replicaId: string;
  logLevel: LogLevel;
  /** The single-Redis state store URL (TB_REDIS_URL), when that is the shape chosen. */
  redisUrl: string | undefined;
  /** State store (one of three shapes); undefined selects embedded mode (memory, one replica). */
  stateStore: StateStoreConfig | undefined;
  /**
   * Replicas that must acknowledge a commit (WAIT) before it counts as stored;
   * undefined: detected at start (1 when the state store has replicas, else 0).
   */
  redisMinReplicas: number | undefined;
  /** How long one WAIT for replica acknowledgements lasts before the commit is retried. */
  redisWaitTimeoutMs: number;
  /** REVOKED, REAUTH_REQUIRED and IDLE sessions are deleted once dead this long. */
  sessionRetentionMs: number;
  /** How long start-up waits for TB_REDIS_URL to answer before it gives up (exit 2). */
  redisConnectTimeoutMs: number;
  redlockUrls: string[];
  keyPrefix: string;
  sealingKeysText: string | undefined;
  sealingKeysSetting: string;
  /** The default IdP (sessions enrolled without naming one use it). */
  idp: IdpConfig;
  /** Every configured IdP, the default first. */
  idps: IdpConfig[];
  /** Where system users' password files live (Enroll login.password_file); none: not accepted. */
  secretsDir: string | undefined;
  rotation: Readonly<RotationPolicyOptions>;
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
  /** Login sessions log in again this long before their token family's known end. */
  loginAheadMs: number;
  shutdownGraceMs: number;
  watch: WatchLimits;
  /** Connections live at most this long (plus grace), so streams spread again after a restart. */
  connectionAge: ConnectionAge;
}

export interface ConnectionAge {
  maxMs: number;
  /** Calls still open when the age is reached get this long before they are cancelled. */
  graceMs: number;
}

export const DEFAULT_CONNECTION_AGE: Readonly<ConnectionAge> = { maxMs: 300_000, graceMs: 30_000 };

/** Per-stream bounds of a Watch stream (a peer that never reads must not grow memory). */
export interface WatchLimits {
  /** Sessions one stream may watch at once; past it a subscription is refused, the stream lives. */
  maxSubscriptions: number;
  /** Encoded answers queued for a peer that stops reading; past it the stream is ended. */
  maxQueuedBytes: number;
}

export const DEFAULT_WATCH_LIMITS: Readonly<WatchLimits> = {
  maxSubscriptions: 10_000,
  maxQueuedBytes: 16 * 1024 * 1024,
};

const UNIT = 'of milliseconds or a count';

type IdpField = keyof typeof IDP_VARIABLES;

/** The single-IdP variables, by the field name TB_IDPS_FILE entries use. */
const IDP_VARIABLES = {
  name: 'TB_IDP_NAME',
  type: 'TB_IDP_TYPE',
  folioUrl: 'TB_IDP_FOLIO_URL',
  issuer: 'TB_IDP_ISSUER',
  tokenEndpoint: 'TB_IDP_TOKEN_ENDPOINT',
  revocationEndpoint: 'TB_IDP_REVOCATION_ENDPOINT',
  introspectionEndpoint: 'TB_IDP_INTROSPECTION_ENDPOINT',
  clientId: 'TB_IDP_CLIENT_ID',
  clientSecret: 'TB_IDP_CLIENT_SECRET',
  clientSecretFile: 'TB_IDP_CLIENT_SECRET_FILE',
  authMethod: 'TB_IDP_AUTH_METHOD',
  scope: 'TB_IDP_SCOPE',
  exchangeTokenType: 'TB_IDP_EXCHANGE_TOKEN_TYPE',
  timeoutMs: 'TB_IDP_TIMEOUT_MS',
  answerWaitMs: 'TB_IDP_ANSWER_WAIT_MS',
  profile: 'TB_IDP_PROFILE',
  reuseGraceMs: 'TB_IDP_REUSE_GRACE_MS',
  refreshIntrospection: 'TB_IDP_REFRESH_INTROSPECTION',
} as const;

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/**
 * Every variable the broker reads. Any other TB_* variable stops it: a misspelt one would
 * otherwise be ignored and its default used. README.md lists each.
 */
export const BROKER_VARIABLES: ReadonlySet<string> = new Set([
  'TB_GRPC_ADDRESS',
  'TB_GRPC_MAX_CONNECTION_AGE_MS',
  'TB_GRPC_MAX_CONNECTION_AGE_GRACE_MS',
  'TB_REPLICA_ID',
  'TB_LOG_LEVEL',
  'TB_TELEMETRY',
  'TB_TRACE_CLIENT_SPANS',
  'TB_REDIS_URL',
  'TB_REDIS_CONNECT_TIMEOUT_MS',
  'TB_REDIS_PASSWORD_FILE',
  'TB_REDIS_SENTINELS',
  'TB_REDIS_SENTINEL_MASTER',
  'TB_REDIS_SENTINEL_PASS_FILE',
  'TB_REDIS_CLUSTER_NODES',
  'TB_REDIS_TLS',
  'TB_REDIS_CA_FILE',
  'TB_REDIS_MIN_REPLICAS',
  'TB_REDIS_WAIT_TIMEOUT_MS',
  'TB_SESSION_RETENTION_MS',
  'TB_REDLOCK_URLS',
  'TB_KEY_PREFIX',
  'TB_SEALING_KEYS',
  'TB_SEALING_KEYS_FILE',
  'TB_SECRETS_DIR',
  'TB_IDPS_FILE',
  ...Object.values(IDP_VARIABLES),
  'TB_TLS',
  'TB_TLS_CERT_FILE',
  'TB_TLS_KEY_FILE',
  'TB_TLS_CLIENT_CA_FILE',
  'TB_AUTH',
  'TB_AUTH_ISSUER',
  'TB_AUTH_AUDIENCE',
  'TB_AUTH_JWKS_FILE',
  'TB_AUTH_ISSUER_CA_FILE',
  'TB_AUTH_ISSUER_TOKEN_FILE',
  'TB_POLICY_FILE',
  'TB_REFRESH_RATIO',
  'TB_REFRESH_JITTER_RATIO',
  'TB_REFRESH_MIN_LEAD_MS',
  'TB_RETRY_BASE_MS',
  'TB_RETRY_MAX_MS',
  'TB_LOCK_TTL_MS',
  'TB_LOCK_EXTEND_BEFORE_MS',
  'TB_LOCK_MARGIN_MS',
  'TB_LOCK_RETRY_COUNT',
  'TB_LOCK_RETRY_DELAY_MS',
  'TB_CLAIM_POLL_MS',
  'TB_CLAIM_BATCH',
  'TB_ROTATION_CONCURRENCY',
  'TB_CLAIM_LEASE_MS',
  'TB_SESSION_IDLE_TIMEOUT_MS',
  'TB_REFRESH_MIN_INTERVAL_MS',
  'TB_REFRESH_WAIT_MS',
  'TB_PERSIST_RETRY_MS',
  'TB_LOGIN_AHEAD_MS',
  'TB_SHUTDOWN_GRACE_MS',
  'TB_WATCH_MAX_SUBSCRIPTIONS',
  'TB_WATCH_MAX_QUEUED_BYTES',
]);

/** Other programs' variables, which a shell shared with them may hold: not the broker's to judge. */
const OTHER_PROGRAMS = /^TB_(SIDECAR_|BROKER_(ADDRESS|CA_FILE|SERVER_NAME|TOKEN_FILE)$)/;

export function loadConfig(env: Env = process.env): BrokerConfig {
  for (const name of Object.keys(env))
    if (name.startsWith('TB_') && !BROKER_VARIABLES.has(name) && !OTHER_PROGRAMS.test(name))
      throw new ConfigError(
        name,
        'is not a broker setting (README.md, "Configuration", lists every one)',
      );
  const read = reader(env);
  const givenRedisUrl = read.url('TB_REDIS_URL', ['redis:', 'rediss:']);
  const sentinels = readRedisAddresses(read, 'TB_REDIS_SENTINELS');
  const clusterNodes = readRedisAddresses(read, 'TB_REDIS_CLUSTER_NODES');
  const shapes = [
    givenRedisUrl && 'TB_REDIS_URL',
    sentinels.length > 0 && 'TB_REDIS_SENTINELS',
    clusterNodes.length > 0 && 'TB_REDIS_CLUSTER_NODES',
  ].filter((s): s is string => typeof s === 'string');
  if (shapes.length > 1)
    throw new ConfigError(
      shapes[1]!,
      `and ${shapes[0]} are exclusive: give the state store one way`,
    );
  const stateSetting = shapes[0];
  const givenRedlockUrls = read.list('TB_REDLOCK_URLS');
  for (const [i, url] of givenRedlockUrls.entries())
    checkUrl(`TB_REDLOCK_URLS[${i}]`, url, ['redis:', 'rediss:']);
  if (givenRedlockUrls.length > 0 && !stateSetting)
    throw new ConfigError('TB_REDLOCK_URLS', 'needs TB_REDIS_URL (the state store) as well');
  if (givenRedlockUrls.length === 0 && stateSetting && stateSetting !== 'TB_REDIS_URL')
    throw new ConfigError(
      'TB_REDLOCK_URLS',
      `is required with ${stateSetting}: locks live on independent Redis masters, not on the replicated state store`,
    );
  const redisPassword = readRedisPassword(read, stateSetting);
  const redisUrl = givenRedisUrl && withRedisPassword('TB_REDIS_URL', givenRedisUrl, redisPassword);
  const redlockUrls = givenRedlockUrls.map((url, i) =>
    withRedisPassword(`TB_REDLOCK_URLS[${i}]`, url, redisPassword),
  );
  const stateStore = readStateStore(read, {
    redisUrl,
    sentinels,
    clusterNodes,
    password: redisPassword,
  });

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
  if (stateSetting && !sealingKeysText)
    throw new ConfigError(
      'TB_SEALING_KEYS',
      `is required with ${stateSetting}: state at rest is sealed (format kid:base64-32-bytes)`,
    );

  const idps = readIdps(read);
  const idp = idps[0]!;
  const idpTimeoutMs = Math.max(...idps.map((i) => i.timeoutMs));
  const timeoutSetting = idps.find((i) => i.timeoutMs === idpTimeoutMs)!.timeoutSetting;
  const secretsDir = read.string('TB_SECRETS_DIR');
  if (secretsDir && !isDirectory(secretsDir))
    throw new ConfigError('TB_SECRETS_DIR', 'must name an existing directory');

  const lockTtlMs = read.int('TB_LOCK_TTL_MS', 15_000, { min: 1_000, max: 600_000, unit: UNIT });
  const extendBeforeMs = read.int('TB_LOCK_EXTEND_BEFORE_MS', Math.round(lockTtlMs / 3), {
    min: 100,
    unit: UNIT,
  });
  const marginMs = read.int('TB_LOCK_MARGIN_MS', 1_000, { min: 0, unit: UNIT });
  if (extendBeforeMs > lockTtlMs - 100)
    throw new ConfigError('TB_LOCK_EXTEND_BEFORE_MS', `must be at most TB_LOCK_TTL_MS - 100`);
  // The IdP call must end, or be aborted, before the lock could lapse even without extension.
  if (idpTimeoutMs + marginMs > lockTtlMs - extendBeforeMs)
    throw new ConfigError(
      timeoutSetting,
      `(${idpTimeoutMs}) plus TB_LOCK_MARGIN_MS (${marginMs}) must fit in TB_LOCK_TTL_MS - TB_LOCK_EXTEND_BEFORE_MS (${lockTtlMs - extendBeforeMs})`,
    );

  const config: BrokerConfig = {
    grpcAddress: readListenAddress(read),
    tls: readTls(read, stateStore !== undefined),
    auth: readAuth(read),
    replicaId: read.string('TB_REPLICA_ID') ?? `${hostname()}-${process.pid}`,
    logLevel: read.oneOf('TB_LOG_LEVEL', LOG_LEVELS, 'info'),
    redisUrl,
    stateStore,
    redisMinReplicas: readMinReplicas(read),
    redisWaitTimeoutMs: read.int('TB_REDIS_WAIT_TIMEOUT_MS', 1_000, {
      min: 10,
      max: 60_000,
      unit: UNIT,
    }),
    sessionRetentionMs: read.int('TB_SESSION_RETENTION_MS', 7 * 24 * 3_600_000, {
      min: 1_000,
      max: Number.MAX_SAFE_INTEGER,
      unit: UNIT,
    }),
    redisConnectTimeoutMs: read.int('TB_REDIS_CONNECT_TIMEOUT_MS', 10_000, {
      min: 100,
      max: 600_000,
      unit: UNIT,
    }),
    redlockUrls: redlockUrls.length > 0 ? redlockUrls : redisUrl ? [redisUrl] : [],
    keyPrefix: readKeyPrefix(read),
    sealingKeysText,
    sealingKeysSetting,
    idp: withoutSetting(idp),
    idps: idps.map(withoutSetting),
    secretsDir,
    rotation: rotationPolicyOptions(
      {
        ratio: read.number('TB_REFRESH_RATIO', 0.75),
        jitterRatio: read.number('TB_REFRESH_JITTER_RATIO', 0.05),
        minLeadMs: read.int('TB_REFRESH_MIN_LEAD_MS', 10_000, { min: 0, unit: UNIT }),
        retryBaseMs: read.int('TB_RETRY_BASE_MS', 500, { min: 10, unit: UNIT }),
        retryMaxMs: read.int('TB_RETRY_MAX_MS', 30_000, { min: 10, unit: UNIT }),
      },
      ROTATION_VARIABLES,
    ),
    lock: {
      ttlMs: lockTtlMs,
      extendBeforeMs,
      marginMs,
      retryCount: read.int('TB_LOCK_RETRY_COUNT', 3, { min: 0, max: 100, unit: UNIT }),
      retryDelayMs: read.int('TB_LOCK_RETRY_DELAY_MS', 150, { min: 10, unit: UNIT }),
    },
    worker: {
      pollIntervalMs: read.int('TB_CLAIM_POLL_MS', 250, { min: 10, unit: UNIT }),
      batchSize: read.int('TB_CLAIM_BATCH', 32, { min: 1, max: 1_000, unit: UNIT }),
      concurrency: read.int('TB_ROTATION_CONCURRENCY', 32, { min: 1, max: 1_000, unit: UNIT }),
      claimLeaseMs: read.int('TB_CLAIM_LEASE_MS', lockTtlMs * 2, { min: 1_000, unit: UNIT }),
    },
    sessionIdleTimeoutMs: read.int('TB_SESSION_IDLE_TIMEOUT_MS', 3_600_000, {
      min: 1_000,
      unit: UNIT,
    }),
    refreshMinIntervalMs: read.int('TB_REFRESH_MIN_INTERVAL_MS', 1_000, { min: 0, unit: UNIT }),
    refreshWaitMs: read.int('TB_REFRESH_WAIT_MS', 10_000, { min: 100, unit: UNIT }),
    persistRetryMs: read.int('TB_PERSIST_RETRY_MS', 30_000, { min: 0, unit: UNIT }),
    loginAheadMs: read.int('TB_LOGIN_AHEAD_MS', 300_000, { min: 0, unit: UNIT }),
    shutdownGraceMs: read.int('TB_SHUTDOWN_GRACE_MS', 20_000, { min: 0, unit: UNIT }),
    watch: {
      maxSubscriptions: read.int(
        'TB_WATCH_MAX_SUBSCRIPTIONS',
        DEFAULT_WATCH_LIMITS.maxSubscriptions,
        { min: 1, max: 1_000_000, unit: 'of subscriptions' },
      ),
      maxQueuedBytes: read.int('TB_WATCH_MAX_QUEUED_BYTES', DEFAULT_WATCH_LIMITS.maxQueuedBytes, {
        min: 65_536,
        max: 1_073_741_824,
        why: 'one answer must fit',
        unit: 'of bytes',
      }),
    },
    connectionAge: {
      maxMs: read.int('TB_GRPC_MAX_CONNECTION_AGE_MS', DEFAULT_CONNECTION_AGE.maxMs, {
        min: 1_000,
        unit: UNIT,
      }),
      graceMs: read.int('TB_GRPC_MAX_CONNECTION_AGE_GRACE_MS', DEFAULT_CONNECTION_AGE.graceMs, {
        min: 0,
        unit: UNIT,
      }),
    },
  };
  if (config.worker.claimLeaseMs <= lockTtlMs)
    throw new ConfigError('TB_CLAIM_LEASE_MS', `must exceed TB_LOCK_TTL_MS (${lockTtlMs})`);
  return config;
}

/**
 * TB_REDIS_PASSWORD_FILE: the Redis password as a file (a mounted Secret), so it is in no
 * environment variable. One trailing newline is dropped, as `echo` or an editor leaves it.
 */
function readRedisPassword(read: EnvReader, stateSetting: string | undefined): string | undefined {
  const file = read.string('TB_REDIS_PASSWORD_FILE');
  if (file === undefined) return undefined;
  if (!stateSetting) throw new ConfigError('TB_REDIS_PASSWORD_FILE', 'needs TB_REDIS_URL as well');
  return readPasswordFile('TB_REDIS_PASSWORD_FILE', file);
}

function readPasswordFile(setting: string, file: string): string {
  let password: string;
  try {
    password = readFileSync(file, 'utf8').replace(/\r?\n$/, '');
  } catch (err) {
    throw new ConfigError(
      setting,
      `cannot be read: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
    );
  }
  if (password === '') throw new ConfigError(setting, 'names an empty file');
  if (/[\r\n]/.test(password)) throw new ConfigError(setting, 'must hold one line (the password)');
  return password;
}

/** A `host:port` list (TB_REDIS_SENTINELS, TB_REDIS_CLUSTER_NODES); empty when unset. */
function readRedisAddresses(read: EnvReader, setting: string): RedisAddress[] {
  return read.list(setting).map((entry, i) => {
    const match = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(entry);
    const port = Number(match?.[2]);
    if (!match || port < 1 || port > 65_535)
      throw new ConfigError(
        `${setting}[${i}]`,
        `must be host:port, got ${JSON.stringify(entry.slice(0, 80))}`,
      );
    return { host: match[1]!.replace(/^\[(.*)\]$/, '$1'), port };
  });
}

/** The state store shape; the Sentinel and Cluster settings only apply to their shape. */
function readStateStore(
  read: EnvReader,
  given: {
    redisUrl: string | undefined;
    sentinels: RedisAddress[];
    clusterNodes: RedisAddress[];
    password: string | undefined;
  },
): StateStoreConfig | undefined {
  const master = read.string('TB_REDIS_SENTINEL_MASTER');
  const sentinelPasswordFile = read.string('TB_REDIS_SENTINEL_PASS_FILE');
  const sentinelMode = given.sentinels.length > 0;
  if (!sentinelMode)
    for (const [setting, value] of [
      ['TB_REDIS_SENTINEL_MASTER', master],
      ['TB_REDIS_SENTINEL_PASS_FILE', sentinelPasswordFile],
    ] as const)
      if (value !== undefined) throw new ConfigError(setting, 'needs TB_REDIS_SENTINELS as well');
  const tlsOn = read.onOff('TB_REDIS_TLS', false);
  const caFile = read.string('TB_REDIS_CA_FILE');
  const hostPortMode = sentinelMode || given.clusterNodes.length > 0;
  if (!hostPortMode && (read.string('TB_REDIS_TLS') !== undefined || caFile !== undefined))
    throw new ConfigError(
      read.string('TB_REDIS_TLS') !== undefined ? 'TB_REDIS_TLS' : 'TB_REDIS_CA_FILE',
      'applies to TB_REDIS_SENTINELS or TB_REDIS_CLUSTER_NODES (with TB_REDIS_URL use rediss://)',
    );
  if (caFile !== undefined && !tlsOn)
    throw new ConfigError('TB_REDIS_CA_FILE', 'needs TB_REDIS_TLS=on as well');
  let tls: RedisTls | undefined;
  if (tlsOn) {
    let ca: string | undefined;
    if (caFile !== undefined)
      try {
        ca = readFileSync(caFile, 'utf8');
      } catch (err) {
        throw new ConfigError(
          'TB_REDIS_CA_FILE',
          `cannot be read: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
        );
      }
    tls = { ca };
  }
  if (given.redisUrl) return { kind: 'single', url: given.redisUrl };
  if (sentinelMode) {
    if (!master)
      throw new ConfigError(
        'TB_REDIS_SENTINEL_MASTER',
        'is required with TB_REDIS_SENTINELS (the name the sentinels monitor)',
      );
    return {
      kind: 'sentinel',
      sentinels: given.sentinels,
      master,
      password: given.password,
      sentinelPassword:
        sentinelPasswordFile === undefined
          ? undefined
          : readPasswordFile('TB_REDIS_SENTINEL_PASS_FILE', sentinelPasswordFile),
      tls,
    };
  }
  if (given.clusterNodes.length > 0)
    return { kind: 'cluster', nodes: given.clusterNodes, password: given.password, tls };
  return undefined;
}

/** TB_REDIS_MIN_REPLICAS: a count, or unset/`auto` to detect it at start. */
function readMinReplicas(read: EnvReader): number | undefined {
  const raw = read.string('TB_REDIS_MIN_REPLICAS');
  if (raw === undefined || raw === 'auto') return undefined;
  return read.int('TB_REDIS_MIN_REPLICAS', 0, { min: 0, max: 100, unit: 'of replicas' });
}

/** TB_KEY_PREFIX: no braces, so each state key's hash tag is its shard tag (keys.ts). */
function readKeyPrefix(read: EnvReader): string {
  const prefix = read.string('TB_KEY_PREFIX') ?? 'tb:';
  if (/[{}]/.test(prefix))
    throw new ConfigError(
      'TB_KEY_PREFIX',
      'must not contain { or }: the broker puts a Redis Cluster hash tag after it',
    );
  return prefix;
}

/** The URL with the file's password in it; a URL that carries its own password is refused. */
function withRedisPassword(setting: string, url: string, password: string | undefined): string {
  if (password === undefined) return url;
  const parsed = new URL(url);
  if (parsed.password)
    throw new ConfigError(
      setting,
      'carries a password, and TB_REDIS_PASSWORD_FILE gives one: set the password in one place',
    );
  parsed.password = encodeURIComponent(password);
  return parsed.toString();
}

/**
 * TLS is on whenever certificate files are given. In Redis mode (a production topology) it is
 * required unless TB_TLS=off says otherwise explicitly; embedded mode may stay plaintext.
 */
function readTls(read: EnvReader, redisMode: boolean): TlsConfig | undefined {
  const certFile = read.string('TB_TLS_CERT_FILE');
  const keyFile = read.string('TB_TLS_KEY_FILE');
  const clientCaFile = read.string('TB_TLS_CLIENT_CA_FILE');
  if (!read.onOff('TB_TLS', true)) {
    for (const [name, value] of [
      ['TB_TLS_CERT_FILE', certFile],
      ['TB_TLS_KEY_FILE', keyFile],
      ['TB_TLS_CLIENT_CA_FILE', clientCaFile],
    ] as const)
      if (value) throw new ConfigError(name, 'is set but TB_TLS=off turns TLS off: unset one');
    return undefined;
  }
  if (certFile && !keyFile)
    throw new ConfigError('TB_TLS_KEY_FILE', 'is required with TB_TLS_CERT_FILE');
  if (keyFile && !certFile)
    throw new ConfigError('TB_TLS_CERT_FILE', 'is required with TB_TLS_KEY_FILE');
  if (!certFile || !keyFile) {
    if (clientCaFile)
      throw new ConfigError('TB_TLS_CLIENT_CA_FILE', 'needs TB_TLS_CERT_FILE and TB_TLS_KEY_FILE');
    if (redisMode)
      throw new ConfigError(
        'TB_TLS_CERT_FILE',
        'and TB_TLS_KEY_FILE are required with TB_REDIS_URL: tokens cross the network. ' +
          'Set TB_TLS=off explicitly to run plaintext (not for production)',
      );
    return undefined;
  }
  return { certFile, keyFile, clientCaFile };
}

/**
 * Caller authentication is on unless TB_AUTH=off says otherwise explicitly: then every caller
 * that reaches the broker may read, replace or revoke any session.
 */
function readAuth(read: EnvReader): AuthConfig | undefined {
  if (!read.onOff('TB_AUTH', true)) return undefined;
  const issuer = read.url('TB_AUTH_ISSUER', ['https:', 'http:']);
  if (!issuer)
    throw new ConfigError(
      'TB_AUTH_ISSUER',
      "is required: the cluster's service-account issuer (e.g. https://kubernetes.default.svc.cluster.local). " +
        'Set TB_AUTH=off explicitly to accept every caller (not for production)',
    );
  const jwksFile = read.string('TB_AUTH_JWKS_FILE');
  if (!jwksFile && !issuer.startsWith('https:'))
    throw new ConfigError(
      'TB_AUTH_ISSUER',
      'must be an https URL for OIDC discovery (or set TB_AUTH_JWKS_FILE)',
    );
  const issuerCaFile = read.string('TB_AUTH_ISSUER_CA_FILE');
  const issuerTokenFile = read.string('TB_AUTH_ISSUER_TOKEN_FILE');
  if (jwksFile)
    for (const [name, value] of [
      ['TB_AUTH_ISSUER_CA_FILE', issuerCaFile],
      ['TB_AUTH_ISSUER_TOKEN_FILE', issuerTokenFile],
    ] as const)
      if (value) throw new ConfigError(name, 'applies to OIDC discovery, not to TB_AUTH_JWKS_FILE');
  const policyFile = read.string('TB_POLICY_FILE');
  if (!policyFile)
    throw new ConfigError(
      'TB_POLICY_FILE',
      'is required with caller authentication: which service accounts may do what on which sessions (README, "Access policy")',
    );
  const audience = read.string('TB_AUTH_AUDIENCE') ?? 'token-broker';
  return {
    issuer,
    audience,
    discovery: jwksFile === undefined,
    jwksFile,
    issuerCaFile,
    issuerTokenFile,
    policyFile,
  };
}

/** The setting each rotation option came from, for error messages. */
export type RotationPolicyNames = Partial<Record<keyof RotationPolicyOptions, string>>;

const ROTATION_VARIABLES: RotationPolicyNames = {
  ratio: 'TB_REFRESH_RATIO',
  jitterRatio: 'TB_REFRESH_JITTER_RATIO',
  minLeadMs: 'TB_REFRESH_MIN_LEAD_MS',
  retryBaseMs: 'TB_RETRY_BASE_MS',
  retryMaxMs: 'TB_RETRY_MAX_MS',
};

/**
 * The rotation policy's options with defaults for unset ones, checked together (one option's
 * bound may be another's value); each error names the setting in `names`, else the option.
 */
export function rotationPolicyOptions(
  options: Partial<RotationPolicyOptions>,
  names: RotationPolicyNames = {},
): Readonly<RotationPolicyOptions> {
  const merged: RotationPolicyOptions = { ...DEFAULT_ROTATION_POLICY };
  for (const [key, value] of Object.entries(options) as [keyof RotationPolicyOptions, unknown][])
    if (value !== undefined) merged[key] = value as number;
  validate(merged, (key) => names[key] ?? key);
  return Object.freeze(merged);
}

function validate(
  o: RotationPolicyOptions,
  name: (key: keyof RotationPolicyOptions) => string,
): void {
  const fail = (key: keyof RotationPolicyOptions, problem: string): never => {
    throw new ConfigError(name(key), `${problem}, got ${String(o[key])}`);
  };
  for (const key of Object.keys(o) as (keyof RotationPolicyOptions)[]) {
    if (typeof o[key] !== 'number' || !Number.isFinite(o[key]))
      fail(key, 'must be a finite number');
  }
  if (!(o.ratio > 0 && o.ratio < 1)) fail('ratio', 'must be between 0 and 1 (exclusive)');
  if (!(o.jitterRatio >= 0 && o.jitterRatio < o.ratio)) {
    fail('jitterRatio', `must be at least 0 and below ${name('ratio')} (${o.ratio})`);
  }
  if (!(o.minLeadMs >= 0)) fail('minLeadMs', 'must be at least 0');
  if (!(o.minAgeRatio >= 0 && o.minAgeRatio <= 1)) {
    fail('minAgeRatio', 'must be between 0 and 1 (inclusive)');
  }
  if (!(o.retryBaseMs >= 1)) fail('retryBaseMs', 'must be at least 1');
  if (!(o.retryMaxMs >= o.retryBaseMs)) {
    fail('retryMaxMs', `must be at least ${name('retryBaseMs')} (${o.retryBaseMs})`);
  }
  if (!(o.maxRetryAfterMs >= 0)) fail('maxRetryAfterMs', 'must be at least 0');
  if (!(o.expiryMarginMs >= 0)) fail('expiryMarginMs', 'must be at least 0');
}

/** Where an IdP's fields come from: TB_IDP_* variables, or one entry of TB_IDPS_FILE. */
interface IdpSource {
  get: (field: IdpField) => string | undefined;
  setting: (field: IdpField) => string;
}

const OAUTH2_ONLY: readonly IdpField[] = [
  'issuer',
  'tokenEndpoint',
  'revocationEndpoint',
  'introspectionEndpoint',
  'clientId',
  'clientSecret',
  'clientSecretFile',
  'authMethod',
  'scope',
  'exchangeTokenType',
];

type IdpWithSetting = IdpConfig & { timeoutSetting: string };

function withoutSetting({ timeoutSetting: _t, ...idp }: IdpWithSetting): IdpConfig {
  return idp;
}

/** TB_IDPS_FILE when set (several IdPs), else the single IdP of the TB_IDP_* variables. */
function readIdps(read: EnvReader): IdpWithSetting[] {
  const file = read.string('TB_IDPS_FILE');
  if (!file) {
    const source: IdpSource = {
      get: (field) => read.string(IDP_VARIABLES[field]),
      setting: (field) => IDP_VARIABLES[field],
    };
    return [buildIdp(source, 'default', 5_000, DEFAULT_ANSWER_WAIT_MS)];
  }
  for (const [field, variable] of Object.entries(IDP_VARIABLES)) {
    if (!FILE_DEFAULTS.has(field as IdpField) && read.string(variable))
      throw new ConfigError(
        variable,
        'cannot be combined with TB_IDPS_FILE: describe every IdP in that file',
      );
  }
  let entries: unknown;
  try {
    entries = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    // V8's JSON message quotes the input, which may hold a client secret.
    if (err instanceof SyntaxError) throw new ConfigError('TB_IDPS_FILE', 'is not valid JSON');
    throw new ConfigError('TB_IDPS_FILE', `cannot be read: ${(err as Error).message}`);
  }
  if (!Array.isArray(entries) || entries.length === 0)
    throw new ConfigError('TB_IDPS_FILE', 'must hold a non-empty JSON array of IdP objects');
  const defaultTimeout = read.int('TB_IDP_TIMEOUT_MS', 5_000, { min: 100, unit: UNIT });
  const defaultAnswerWait = read.int('TB_IDP_ANSWER_WAIT_MS', DEFAULT_ANSWER_WAIT_MS, {
    min: 100,
    unit: UNIT,
  });
  const idps = entries.map((entry: unknown, i) => {
    const at = `TB_IDPS_FILE[${i}]`;
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry))
      throw new ConfigError(at, 'must be a JSON object');
    const fields = entry as Record<string, unknown>;
    for (const key of Object.keys(fields))
      if (!(key in IDP_VARIABLES))
        throw new ConfigError(
          `${at}.${key}`,
          `is not an IdP setting (known: ${Object.keys(IDP_VARIABLES).join(', ')})`,
        );
    const source: IdpSource = {
      get: (field) => {
        const value = fields[field];
        if (value === undefined || value === null) return undefined;
        if (NUMERIC_FIELDS.has(field) && typeof value === 'number') return String(value);
        if (typeof value !== 'string') throw new ConfigError(`${at}.${field}`, 'must be a string');
        return value.trim() || undefined;
      },
      setting: (field) => `${at}.${field}`,
    };
    if (source.get('name') === undefined)
      throw new ConfigError(`${at}.name`, 'is required with TB_IDPS_FILE');
    return buildIdp(source, '', defaultTimeout, defaultAnswerWait);
  });
  const seen = new Set<string>();
  for (const [i, idp] of idps.entries()) {
    if (seen.has(idp.name))
      throw new ConfigError(`TB_IDPS_FILE[${i}].name`, `repeats ${JSON.stringify(idp.name)}`);
    seen.add(idp.name);
  }
  const wanted = read.string('TB_IDP_NAME');
  if (wanted === undefined) return idps;
  const chosen = idps.find((idp) => idp.name === wanted);
  if (!chosen)
    throw new ConfigError(
      'TB_IDP_NAME',
      `names no IdP of TB_IDPS_FILE (known: ${[...seen].join(', ')})`,
    );
  return [chosen, ...idps.filter((idp) => idp !== chosen)];
}

/** Set once for every entry of TB_IDPS_FILE as a default (an entry may override them). */
const FILE_DEFAULTS = new Set<IdpField>(['name', 'timeoutMs', 'answerWaitMs']);
const NUMERIC_FIELDS = new Set<IdpField>(['timeoutMs', 'answerWaitMs', 'reuseGraceMs']);
const DEFAULT_ANSWER_WAIT_MS = 60_000;

/**
 * The rotation semantics of one IdP: the profile's presets, overridden by explicit settings.
 * The answer wait must exceed the send timeout: it is the bound of the whole call.
 */
function readSemantics(
  source: IdpSource,
  field: EnvReader,
  type: IdpType,
  timeoutMs: number,
  defaultAnswerWait: number,
) {
  const { setting } = source;
  const profile = field.oneOf(
    setting('profile'),
    IDP_PROFILES,
    type === 'folio' ? 'folio' : 'generic',
  );
  if ((profile === 'folio') !== (type === 'folio'))
    throw new ConfigError(
      setting('profile'),
      type === 'folio'
        ? `must be folio with ${setting('type')}=folio`
        : `folio needs ${setting('type')}=folio`,
    );
  const preset = PROFILES[profile];
  const answerWaitMs = field.int(
    setting('answerWaitMs'),
    Math.max(defaultAnswerWait, timeoutMs + 1),
    {
      min: 100,
      max: 600_000,
      unit: UNIT,
    },
  );
  if (answerWaitMs <= timeoutMs)
    throw new ConfigError(
      setting('answerWaitMs'),
      `(${answerWaitMs}) must exceed ${setting('timeoutMs')} (${timeoutMs}): it bounds the whole call once the request is sent`,
    );
  const reuseGraceMs = field.int(setting('reuseGraceMs'), preset.reuseGraceMs, {
    min: 0,
    max: 3_600_000,
    unit: UNIT,
  });
  if (reuseGraceMs > 0 && !preset.offersReuseGrace)
    throw new ConfigError(
      setting('reuseGraceMs'),
      `must be 0 with ${setting('profile')}=${profile}: that IdP offers no reuse grace period, a second presentation would be a reuse`,
    );
  const refreshIntrospection = field.oneOf(
    setting('refreshIntrospection'),
    REFRESH_INTROSPECTION_MODES,
    preset.refreshIntrospection,
  );
  if (type === 'folio' && refreshIntrospection !== 'off')
    throw new ConfigError(setting('refreshIntrospection'), 'must be off with FOLIO (it has none)');
  return { profile, answerWaitMs, reuseGraceMs, refreshIntrospection };
}

function buildIdp(
  source: IdpSource,
  defaultName: string,
  defaultTimeout: number,
  defaultAnswerWait: number,
): IdpWithSetting {
  const { setting } = source;
  const field = reader(
    Object.fromEntries(
      Object.keys(IDP_VARIABLES).map((f) => [setting(f as IdpField), source.get(f as IdpField)]),
    ),
  );
  const name = source.get('name') ?? defaultName;
  const type = field.oneOf(setting('type'), IDP_TYPES, 'oauth2');
  const timeoutMs = field.int(setting('timeoutMs'), defaultTimeout, { min: 100, unit: UNIT });
  const common = {
    name,
    type,
    timeoutMs,
    timeoutSetting: setting('timeoutMs'),
    ...readSemantics(source, field, type, timeoutMs, defaultAnswerWait),
  };
  if (type === 'folio') {
    for (const other of OAUTH2_ONLY)
      if (source.get(other) !== undefined)
        throw new ConfigError(setting(other), `does not apply to ${setting('type')}=folio`);
    const folioUrl = field.url(setting('folioUrl'), ['http:', 'https:']);
    if (!folioUrl)
      throw new ConfigError(
        setting('folioUrl'),
        `is required with ${setting('type')}=folio (the Okapi or Kong gateway base URL)`,
      );
    return {
      ...common,
      folioUrl,
      issuer: undefined,
      tokenEndpoint: undefined,
      revocationEndpoint: undefined,
      introspectionEndpoint: undefined,
      clientId: '',
      clientSecret: undefined,
      authMethod: 'none',
      scope: undefined,
      exchangeTokenType: undefined,
    };
  }
  if (source.get('folioUrl') !== undefined)
    throw new ConfigError(setting('folioUrl'), `applies only to ${setting('type')}=folio`);
  const issuer = field.url(setting('issuer'), ['http:', 'https:']);
  const tokenEndpoint = field.url(setting('tokenEndpoint'), ['http:', 'https:']);
  if (!issuer && !tokenEndpoint)
    throw new ConfigError(
      setting('tokenEndpoint'),
      `or ${setting('issuer')} (OIDC discovery) is required`,
    );
  const secretFile = source.get('clientSecretFile');
  let clientSecret = source.get('clientSecret');
  if (secretFile) {
    try {
      clientSecret = readFileSync(secretFile, 'utf8').trim();
    } catch (err) {
      throw new ConfigError(
        setting('clientSecretFile'),
        `cannot be read: ${(err as Error).message}`,
      );
    }
  }
  const authMethod = field.oneOf(
    setting('authMethod'),
    ['client_secret_basic', 'client_secret_post', 'none'] as const,
    'client_secret_basic',
  );
  // A public client sends no secret; one configured anyway is a mistake worth stopping for.
  if (authMethod === 'none' && clientSecret !== undefined)
    throw new ConfigError(
      secretFile ? setting('clientSecretFile') : setting('clientSecret'),
      `must not be set with ${setting('authMethod')}=none (a public client sends no secret)`,
    );
  if (authMethod !== 'none' && !clientSecret)
    throw new ConfigError(
      setting('clientSecret'),
      `is required with ${setting('authMethod')}=${authMethod} (or set ${setting('clientSecretFile')})`,
    );
  return {
    ...common,
    folioUrl: undefined,
    issuer,
    tokenEndpoint,
    revocationEndpoint: field.url(setting('revocationEndpoint'), ['http:', 'https:']),
    introspectionEndpoint: field.url(setting('introspectionEndpoint'), ['http:', 'https:']),
    clientId: field.required(setting('clientId')),
    clientSecret,
    authMethod,
    scope: source.get('scope'),
    exchangeTokenType: source.get('exchangeTokenType'),
  };
}

/**
 * `host:port` (a name, an IPv4 address or a bracketed IPv6 address; port 0 picks a free one):
 * grpc-js would otherwise fail late with an error that names no variable, or bind something else.
 */
function readListenAddress(read: EnvReader): string {
  const address = read.string('TB_GRPC_ADDRESS') ?? '0.0.0.0:50051';
  const match = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$/.exec(
    address,
  );
  const port = Number(match?.[3]);
  if (!match || port > 65_535)
    throw new ConfigError(
      'TB_GRPC_ADDRESS',
      `must be host:port (e.g. 0.0.0.0:50051 or [::]:50051, port 0 to 65535), got ${JSON.stringify(address.slice(0, 100))}`,
    );
  return address;
}

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}
