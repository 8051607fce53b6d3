import { ConfigError } from './errors.js';
import { idProblem, type SessionRef } from './session-ref.js';

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
}

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** The broker refuses client pings more often than this while a connection carries no data. */
export const BROKER_MIN_PING_INTERVAL_MS = 5_000;

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

type Env = Record<string, string | undefined>;

export function loadSidecarConfig(env: Env = process.env): SidecarConfig {
  // A misspelt variable would otherwise be ignored silently and its default used.
  for (const name of Object.keys(env))
    if (name.startsWith('TB_SIDECAR_') && !KNOWN.has(name))
      throw new ConfigError(name, `is not a sidecar setting (known: ${[...KNOWN].join(', ')})`);

  const read = new EnvReader(env);
  const brokerAddress = read.required('TB_SIDECAR_BROKER_ADDRESS');
  const addressProblem = grpcTargetProblem(brokerAddress);
  if (addressProblem) throw new ConfigError('TB_SIDECAR_BROKER_ADDRESS', addressProblem);

  const tokenDir = read.string('TB_SIDECAR_TOKEN_DIR');
  const users = parseUsers(read.string('TB_SIDECAR_USERS') ?? '', tokenDir !== undefined);

  return {
    brokerAddress,
    port: read.int('TB_SIDECAR_PORT', 8181, 0, 65_535),
    socketPath: read.string('TB_SIDECAR_SOCKET'),
    safetySkewMs: read.int('TB_SIDECAR_SAFETY_SKEW_MS', 10_000, 0, 3_600_000),
    users,
    idleUnsubscribeMs: read.int('TB_SIDECAR_IDLE_UNSUBSCRIBE_MS', 900_000, 1_000, 2 ** 31 - 1),
    maxWaitMs: read.int('TB_SIDECAR_MAX_WAIT_MS', 30_000, 0, 600_000),
    tokenDir,
    logLevel: read.oneOf('TB_SIDECAR_LOG_LEVEL', LOG_LEVELS, 'info'),
    reconnectMaxMs: read.int('TB_SIDECAR_RECONNECT_MAX_MS', 10_000, 100, 600_000),
    keepaliveMs: read.int(
      'TB_SIDECAR_KEEPALIVE_MS',
      10_000,
      BROKER_MIN_PING_INTERVAL_MS,
      600_000,
      'the broker closes connections that ping more often',
    ),
  };
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

  int(name: string, fallback: number, min: number, max: number, why?: string): number {
    const raw = this.string(name);
    if (raw === undefined) return fallback;
    if (!/^\d{1,10}$/.test(raw))
      throw new ConfigError(name, `must be a whole number, got ${JSON.stringify(raw)}`);
    const value = Number(raw);
    if (value < min)
      throw new ConfigError(name, `must be at least ${min}${why ? ` (${why})` : ''}, got ${value}`);
    if (value > max) throw new ConfigError(name, `must be at most ${max}, got ${value}`);
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
