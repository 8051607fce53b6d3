/**
 * The pod annotations that ask for and tune an injected sidecar (README, "Sidecar injection").
 * Each is checked; the first bad one refuses the pod with a message naming it. The settings they
 * give are then passed through the sidecar's own configuration check, so a pod is never admitted
 * with a sidecar that would refuse to start.
 */
import { dirname } from 'node:path/posix';
import { loadSidecarConfig, LOG_LEVELS } from '../sidecar/config.js';
import { ConfigError } from '../sidecar/errors.js';
import { idProblem } from '../shared/session-ref.js';
import { AnnotationError } from './errors.js';
import { sidecarContainer, type EnvVar, type SidecarSettings } from './sidecar-spec.js';

export const PREFIX = 'token-broker.io/';
export const INJECT = `${PREFIX}inject`;
/** Set by the webhook on every pod it changed. */
export const STATUS = `${PREFIX}status`;

export const ANNOTATIONS = {
  inject: INJECT,
  injectFirst: `${PREFIX}inject-first`,
  users: `${PREFIX}users`,
  allowedUsers: `${PREFIX}allowed-users`,
  tokenDir: `${PREFIX}token-dir`,
  tokenDirContainers: `${PREFIX}token-dir-containers`,
  port: `${PREFIX}port`,
  socket: `${PREFIX}socket`,
  safetySkewMs: `${PREFIX}safety-skew-ms`,
  logLevel: `${PREFIX}log-level`,
  cpuRequest: `${PREFIX}cpu-request`,
  cpuLimit: `${PREFIX}cpu-limit`,
  memoryRequest: `${PREFIX}memory-request`,
  memoryLimit: `${PREFIX}memory-limit`,
  image: `${PREFIX}image`,
} as const;

const KNOWN = new Set<string>([...Object.values(ANNOTATIONS), STATUS]);

/** Which sidecar setting each TB_SIDECAR_* variable comes from, to name it in a refusal. */
const SOURCE_OF: Record<string, string> = {
  TB_SIDECAR_USERS: ANNOTATIONS.users,
  TB_SIDECAR_ALLOWED_USERS: ANNOTATIONS.allowedUsers,
  TB_SIDECAR_TOKEN_DIR: ANNOTATIONS.tokenDir,
  TB_SIDECAR_PORT: ANNOTATIONS.port,
  TB_SIDECAR_SOCKET: ANNOTATIONS.socket,
  TB_SIDECAR_SAFETY_SKEW_MS: ANNOTATIONS.safetySkewMs,
  TB_SIDECAR_LOG_LEVEL: ANNOTATIONS.logLevel,
};

export interface Injection {
  settings: SidecarSettings;
  /** Before the pod's other init containers (inject-first), else after them. */
  first: boolean;
  /** The app containers that get the token directory mounted. */
  tokenDirContainers: string[];
}

// Kubernetes' resource.Quantity syntax.
const QUANTITY = /^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$/;
// repository[:port]/path:tag, lower-case repository path as the distribution spec requires.
const IMAGE =
  /^[a-z0-9]+([._-][a-z0-9]+)*(:\d+)?(\/[a-z0-9]+([._/-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const ALLOWED_USER = /^[^/,\s]+\/[^/,\s]+$/;

/** Reads the annotations of a pod whose inject annotation is "true". */
export function readInjection(
  annotations: Record<string, string>,
  base: SidecarSettings,
  appContainers: string[],
): Injection {
  for (const name of Object.keys(annotations))
    if (name.startsWith(PREFIX) && !KNOWN.has(name))
      throw new AnnotationError(
        name,
        `is not a token-broker annotation (known: ${[...KNOWN].filter((k) => k !== STATUS).join(', ')})`,
      );
  const settings = structuredClone(base);
  const get = (name: string) => {
    const value = annotations[name];
    return value === undefined ? undefined : value.trim();
  };

  const first = bool(ANNOTATIONS.injectFirst, get(ANNOTATIONS.injectFirst), false);

  const users = get(ANNOTATIONS.users);
  if (users !== undefined) {
    settings.users = list(ANNOTATIONS.users, users);
    settings.users.forEach((u, i) => {
      const parts = u.split('/');
      const problem =
        parts.length !== 2
          ? 'must be tenant/user with one "/"'
          : (idProblem(parts[0]!) ?? idProblem(parts[1]!));
      if (problem)
        throw new AnnotationError(ANNOTATIONS.users, `entry ${i + 1} (${short(u)}) ${problem}`);
    });
  }
  const allowed = get(ANNOTATIONS.allowedUsers);
  if (allowed !== undefined) {
    settings.allowedUsers = list(ANNOTATIONS.allowedUsers, allowed);
    settings.allowedUsers.forEach((p, i) => {
      if (!ALLOWED_USER.test(p))
        throw new AnnotationError(
          ANNOTATIONS.allowedUsers,
          `entry ${i + 1} (${short(p)}) must be tenant/user (either part may use * as a glob)`,
        );
    });
  }

  const tokenDir = get(ANNOTATIONS.tokenDir);
  if (tokenDir !== undefined) {
    if (
      !/^\/[A-Za-z0-9._/-]*$/.test(tokenDir) ||
      tokenDir.split('/').some((p) => p === '..' || p === '.') ||
      tokenDir === '/'
    )
      throw new AnnotationError(
        ANNOTATIONS.tokenDir,
        `must be an absolute directory path (letters, digits, . _ - /), got ${short(tokenDir)}`,
      );
    settings.tokenDir = tokenDir;
  }
  let tokenDirContainers = settings.tokenDir ? [...appContainers] : [];
  const named = get(ANNOTATIONS.tokenDirContainers);
  if (named !== undefined) {
    if (!settings.tokenDir)
      throw new AnnotationError(
        ANNOTATIONS.tokenDirContainers,
        `needs ${ANNOTATIONS.tokenDir}: there is no token directory to mount`,
      );
    tokenDirContainers = list(ANNOTATIONS.tokenDirContainers, named);
    for (const name of tokenDirContainers)
      if (!appContainers.includes(name))
        throw new AnnotationError(
          ANNOTATIONS.tokenDirContainers,
          `names ${short(name)}, which is no container of this pod (containers: ${appContainers.join(', ')})`,
        );
  }

  const port = get(ANNOTATIONS.port);
  if (port !== undefined) settings.port = int(ANNOTATIONS.port, port, 1, 65_535);
  const socket = get(ANNOTATIONS.socket);
  if (socket !== undefined) {
    // As the library chart's rule: the path goes into the probes' node -e script.
    if (
      !/^\/[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)+$/.test(socket) ||
      socket.length > 107 ||
      socket.includes('/../')
    )
      throw new AnnotationError(
        ANNOTATIONS.socket,
        `must be an absolute file path in a directory (at most 107 bytes), got ${short(socket)}`,
      );
    if (dirname(socket) === settings.tokenDir.replace(/\/$/, ''))
      throw new AnnotationError(ANNOTATIONS.socket, `must not be in ${ANNOTATIONS.tokenDir}`);
    settings.socket = socket;
  }
  const skew = get(ANNOTATIONS.safetySkewMs);
  if (skew !== undefined) settings.safetySkewMs = int(ANNOTATIONS.safetySkewMs, skew, 0, 3_600_000);
  const level = get(ANNOTATIONS.logLevel);
  if (level !== undefined) {
    if (!(LOG_LEVELS as readonly string[]).includes(level))
      throw new AnnotationError(
        ANNOTATIONS.logLevel,
        `must be one of ${LOG_LEVELS.join(', ')}, got ${short(level)}`,
      );
    settings.logLevel = level;
  }

  const quantities = [
    [ANNOTATIONS.cpuRequest, 'requests', 'cpu'],
    [ANNOTATIONS.cpuLimit, 'limits', 'cpu'],
    [ANNOTATIONS.memoryRequest, 'requests', 'memory'],
    [ANNOTATIONS.memoryLimit, 'limits', 'memory'],
  ] as const;
  for (const [name, kind, resource] of quantities) {
    const value = get(name);
    if (value === undefined) continue;
    if (!QUANTITY.test(value))
      throw new AnnotationError(
        name,
        `must be a Kubernetes quantity such as 10m, 0.5, 32Mi, got ${short(value)}`,
      );
    (settings.resources[kind] ??= {})[resource] = value;
  }

  const image = get(ANNOTATIONS.image);
  if (image !== undefined) {
    if (!IMAGE.test(image))
      throw new AnnotationError(ANNOTATIONS.image, `must be repository:tag, got ${short(image)}`);
    const at = image.lastIndexOf(':');
    settings.image = {
      ...settings.image,
      repository: image.slice(0, at),
      tag: image.slice(at + 1),
    };
  }

  checkWithSidecar(settings);
  return { settings, first, tokenDirContainers };
}

/** The sidecar's own check of the environment this sidecar would get. */
function checkWithSidecar(settings: SidecarSettings): void {
  const container = sidecarContainer(settings) as { env: EnvVar[] };
  try {
    loadSidecarConfig(
      Object.fromEntries(
        container.env.filter((e) => e.value !== undefined).map((e) => [e.name, e.value]),
      ),
    );
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    const variable = /^TB_SIDECAR_[A-Z_]+/.exec(err.setting)?.[0] ?? err.setting;
    throw new AnnotationError(
      SOURCE_OF[variable] ?? PREFIX,
      `gives a sidecar setting it refuses: ${err.message}`,
    );
  }
}

export function bool(name: string, value: string | undefined, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (value === 'true') return true;
  if (value === 'false') return false;
  throw new AnnotationError(name, `must be "true" or "false", got ${short(value)}`);
}

function int(name: string, value: string, min: number, max: number): number {
  if (!/^\d+$/.test(value) || Number(value) < min || Number(value) > max)
    throw new AnnotationError(
      name,
      `must be a whole number from ${min} to ${max}, got ${short(value)}`,
    );
  return Number(value);
}

function list(name: string, value: string): string[] {
  const items = value
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  if (items.length === 0) throw new AnnotationError(name, 'names nothing');
  return items;
}

/** A bad value echoed in a refusal, cut short (annotations may hold up to 256 KiB). */
function short(value: string): string {
  return JSON.stringify(value.length > 64 ? `${value.slice(0, 64)}…` : value);
}
