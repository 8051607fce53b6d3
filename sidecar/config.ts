import { EnvReader, type Env } from '../shared/env-reader.js';
import { compileGlob, literalPattern } from '../shared/glob.js';
import { ConfigError } from './errors.js';
import { idProblem, type SessionRef } from '../shared/session-ref.js';

/**
 * The sidecar's configuration, read once from environment variables and validated at start-up.
 * Every error names the exact variable. README.md ("## Sidecar") lists each with its default.
 */
export interface SidecarConfig {
  /** A grpc-js target: `host:port`, `dns:///name:port`, `ipv4:a:p,b:p`, `unix:/path`. */
  brokerAddress: string;
  /** TCP port on 127.0.0.1; 0 picks a free one (logged). Unused when `socketPath` is set. */
  port: number;
  socketPath: string | undefined;
  safetySkewMs: number;
  /** Users prefetched at start, never unsubscribed, awaited by /readyz. */
  users: SessionRef[];
  idleUnsubscribeMs: number;
  maxWaitMs: number;
  tokenDir: string | undefined;
  logLevel: LogLevel;
  reconnectMaxMs: number;
  keepaliveMs: number;
  /** TLS to the broker ('off' only when TB_SIDECAR_BROKER_TLS=off says so). */
  brokerTls: 'off' | { caFile: string | undefined; serverName: string | undefined };
  /** The projected ServiceAccount token sent with every call; undefined: TB_SIDECAR_AUTH=off. */
  tokenFile: string | undefined;
  /** Users this sidecar may serve (tenant/user globs); undefined: any user. */
  allowedUsers: AllowedUser[] | undefined;
  /** The most users held (subscribed) at once. */
  maxUsers: number;
}

/** One TB_SIDECAR_ALLOWED_USERS entry, compiled. */
export interface AllowedUser {
  pattern: string;
  tenant: RegExp;
  user: RegExp;
}

/** Whether `ref` matches one of `allowed` (any user when undefined). */
export function isAllowedUser(
  allowed: readonly AllowedUser[] | undefined,
  ref: SessionRef,
): boolean {
  return (
    allowed === undefined || allowed.some((a) => a.tenant.test(ref.tenant) && a.user.test(ref.user))
  );
}

export const DEFAULT_TOKEN_FILE = '/var/run/secrets/tokens/token-broker';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** The broker accepts client pings this often (its min_ping_interval_without_data). */
export const BROKER_MIN_PING_INTERVAL_MS = 1_000;

const KNOWN = new Set([
  'TB_SIDECAR_BROKER_ADDRESS',
  'TB_SIDECAR_PORT',
  'TB_SIDECAR_SOCKET',
  'TB_SIDECAR_SAFETY_SKEW_MS',
  'TB_SIDECAR_USERS',
  'TB_SIDECAR_IDLE_UNSUBSCRIBE_MS',
  'TB_SIDECAR_MAX_WAIT_MS',
  'TB_SIDECAR_TOKEN_DIR',
  'TB_SIDECAR_LOG_LEVEL',
  'TB_SIDECAR_RECONNECT_MAX_MS',
  'TB_SIDECAR_KEEPALIVE_MS',
  'TB_SIDECAR_BROKER_TLS',
  'TB_SIDECAR_BROKER_CA_FILE',
  'TB_SIDECAR_BROKER_SERVER_NAME',
  'TB_SIDECAR_TOKEN_FILE',
  'TB_SIDECAR_AUTH',
  'TB_SIDECAR_ALLOWED_USERS',
  'TB_SIDECAR_MAX_USERS',
]);

export function loadSidecarConfig(env: Env = process.env): SidecarConfig {
  // A misspelt variable would otherwise be ignored silently and its default used.
  for (const name of Object.keys(env))
    if (name.startsWith('TB_SIDECAR_') && !KNOWN.has(name))
      throw new ConfigError(name, `is not a sidecar setting (known: ${[...KNOWN].join(', ')})`);

  const read = new EnvReader(env, (setting, problem) => new ConfigError(setting, problem));
  const brokerAddress = read.required('TB_SIDECAR_BROKER_ADDRESS');
  const addressProblem = grpcTargetProblem(brokerAddress);
  if (addressProblem) throw new ConfigError('TB_SIDECAR_BROKER_ADDRESS', addressProblem);

  const tokenDir = read.string('TB_SIDECAR_TOKEN_DIR');
  const users = parseUsers(read.string('TB_SIDECAR_USERS') ?? '', tokenDir !== undefined);
  const allowedText = read.string('TB_SIDECAR_ALLOWED_USERS');
  const allowedUsers =
    allowedText !== undefined
      ? parseAllowedUsers(allowedText)
      : users.length > 0
        ? users.map((u) => exactUser(u))
        : undefined;
  // Without TB_SIDECAR_ALLOWED_USERS the list is made of the users themselves: each matches (and
  // checking 2,000 users against 2,000 patterns would cost a visible part of the start-up).
  if (allowedText !== undefined && allowedUsers)
    for (const [i, ref] of users.entries())
      if (!isAllowedUser(allowedUsers, ref))
        throw new ConfigError(
          `TB_SIDECAR_USERS[${i}]`,
          'is not matched by TB_SIDECAR_ALLOWED_USERS: the sidecar could never serve it',
        );
  const maxUsers = read.int('TB_SIDECAR_MAX_USERS', 1000, { min: 1, max: 1_000_000 });
  if (users.length > maxUsers)
    throw new ConfigError(
      'TB_SIDECAR_USERS',
      `lists ${users.length} users, more than TB_SIDECAR_MAX_USERS (${maxUsers})`,
    );
  const tlsOn = read.onOff('TB_SIDECAR_BROKER_TLS', true);
  const caFile = read.string('TB_SIDECAR_BROKER_CA_FILE');
  const serverName = read.string('TB_SIDECAR_BROKER_SERVER_NAME');
  if (!tlsOn && (caFile || serverName))
    throw new ConfigError(
      caFile ? 'TB_SIDECAR_BROKER_CA_FILE' : 'TB_SIDECAR_BROKER_SERVER_NAME',
      'is set but TB_SIDECAR_BROKER_TLS=off turns TLS off: unset one',
    );
  const authOn = read.onOff('TB_SIDECAR_AUTH', true);
  const tokenFile = read.string('TB_SIDECAR_TOKEN_FILE') ?? DEFAULT_TOKEN_FILE;
  if (!authOn && read.string('TB_SIDECAR_TOKEN_FILE'))
    throw new ConfigError(
      'TB_SIDECAR_TOKEN_FILE',
      'is set but TB_SIDECAR_AUTH=off sends no token: unset one',
    );

  return {
    brokerAddress,
    port: read.int('TB_SIDECAR_PORT', 8181, { min: 0, max: 65_535 }),
    socketPath: readSocketPath(read),
    safetySkewMs: read.int('TB_SIDECAR_SAFETY_SKEW_MS', 10_000, { min: 0, max: 3_600_000 }),
    users,
    idleUnsubscribeMs: read.int('TB_SIDECAR_IDLE_UNSUBSCRIBE_MS', 900_000, {
      min: 1_000,
      max: 2 ** 31 - 1,
    }),
    maxWaitMs: read.int('TB_SIDECAR_MAX_WAIT_MS', 30_000, { min: 0, max: 600_000 }),
    tokenDir,
    logLevel: read.oneOf('TB_SIDECAR_LOG_LEVEL', LOG_LEVELS, 'info'),
    reconnectMaxMs: read.int('TB_SIDECAR_RECONNECT_MAX_MS', 10_000, { min: 100, max: 600_000 }),
    keepaliveMs: read.int('TB_SIDECAR_KEEPALIVE_MS', 3_000, {
      min: BROKER_MIN_PING_INTERVAL_MS,
      max: 600_000,
      why: 'the broker closes connections that ping more often',
    }),
    brokerTls: tlsOn ? { caFile, serverName } : 'off',
    tokenFile: authOn ? tokenFile : undefined,
    allowedUsers,
    maxUsers,
  };
}

function exactUser(ref: SessionRef): AllowedUser {
  return {
    pattern: `${ref.tenant}/${ref.user}`,
    tenant: literalPattern(ref.tenant),
    user: literalPattern(ref.user),
  };
}

function parseAllowedUsers(text: string): AllowedUser[] {
  const items = text
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  if (items.length === 0)
    throw new ConfigError('TB_SIDECAR_ALLOWED_USERS', 'names no tenant/user pattern');
  return items.map((item, i) => {
    const parts = item.split('/');
    if (parts.length !== 2 || parts[0] === '' || parts[1] === '')
      throw new ConfigError(
        `TB_SIDECAR_ALLOWED_USERS[${i}]`,
        `must be tenant/user (each may use *), got ${JSON.stringify(item)}`,
      );
    return { pattern: item, tenant: compileGlob(parts[0]!), user: compileGlob(parts[1]!) };
  });
}

function parseUsers(text: string, asFileNames: boolean): SessionRef[] {
  const users: SessionRef[] = [];
  const seen = new Set<string>();
  const items = text
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  for (const [i, item] of items.entries()) {
    const setting = `TB_SIDECAR_USERS[${i}]`;
    const parts = item.split('/');
    if (parts.length !== 2)
      throw new ConfigError(
        setting,
        `must be tenant/user with one "/", got ${JSON.stringify(item)}`,
      );
    const [tenant, user] = parts as [string, string];
    for (const [name, value] of [
      ['tenant', tenant],
      ['user', user],
    ] as const) {
      const problem = idProblem(value);
      if (problem) throw new ConfigError(setting, `${name} ${problem}`);
      // Each listed user is also a file <dir>/<tenant>/<user>.
      if (asFileNames && (value === '.' || value === '..'))
        throw new ConfigError(setting, `${name} cannot be a file name with TB_SIDECAR_TOKEN_DIR`);
    }
    const key = `${tenant}/${user}`;
    if (seen.has(key)) continue;
    seen.add(key);
    users.push({ tenant, user });
  }
  return users;
}

const SCHEMES = ['dns', 'ipv4', 'ipv6', 'unix', 'unix-abstract'];

/** A cheap check of a grpc-js target, so a typo fails at start-up instead of on each connect. */
function grpcTargetProblem(target: string): string | undefined {
  if (/\s/.test(target)) return 'must not contain spaces';
  const scheme = /^([a-z][a-z0-9+.-]*):(?!\d+$)/i.exec(target)?.[1]?.toLowerCase();
  if (scheme && SCHEMES.includes(scheme)) {
    const rest = target.slice(scheme.length + 1);
    if (scheme === 'dns') {
      const hostPort = rest.replace(/^\/\/[^/]*\//, '');
      return hasPort(hostPort)
        ? undefined
        : `must name a port, as dns:///host:port, got ${JSON.stringify(target)}`;
    }
    return rest === '' ? `names no address after ${scheme}:` : undefined;
  }
  return hasPort(target)
    ? undefined
    : `must be host:port, dns:///host:port, ipv4:a:p,b:p or unix:/path, got ${JSON.stringify(target)}`;
}

function hasPort(hostPort: string): boolean {
  const match = /^(\[[0-9a-f:.]+\]|[^:[\]]+):(\d{1,5})$/i.exec(hostPort);
  return match !== null && Number(match[2]) > 0 && Number(match[2]) <= 65_535;
}

/** Linux keeps a socket's path in 108 bytes, NUL included; a longer one fails to bind. */
const MAX_SOCKET_PATH_BYTES = 107;

function readSocketPath(read: EnvReader): string | undefined {
  const path = read.string('TB_SIDECAR_SOCKET');
  if (path === undefined) return undefined;
  if (path.includes('\0'))
    throw new ConfigError('TB_SIDECAR_SOCKET', 'must be a file path (it holds a NUL byte)');
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH_BYTES)
    throw new ConfigError(
      'TB_SIDECAR_SOCKET',
      `must be at most ${MAX_SOCKET_PATH_BYTES} bytes long (a Unix socket path), got ${Buffer.byteLength(path)}`,
    );
  return path;
}
