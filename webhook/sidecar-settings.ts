/**
 * The sidecar settings file (TB_WEBHOOK_SIDECAR_FILE): the library chart's `tokenBroker` values as
 * JSON, which the chart writes from `webhook.sidecar` and the broker release's own address, CA and
 * audience. Read once at start-up over DEFAULTS; an unknown key or a wrong type fails naming it.
 */
import { readFileSync } from 'node:fs';
import { dirname } from 'node:path/posix';
import { DEFAULTS, CHART_SET_VARIABLES, type SidecarSettings } from './sidecar-spec.js';
import { WebhookConfigError } from './errors.js';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

const GROUPS = ['image', 'serviceAccountToken', 'tls', 'telemetry'] as const;
const FREE_FORM = new Set(['env', 'resources', 'podLabels']);

export function readSidecarSettings(
  file: string,
  setting = 'TB_WEBHOOK_SIDECAR_FILE',
): SidecarSettings {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new WebhookConfigError(
      setting,
      err instanceof SyntaxError
        ? `(${file}) is not valid JSON`
        : `(${file}) cannot be read: ${(err as Error).message}`,
    );
  }
  return mergeSettings(parsed, setting);
}

/** `given` over DEFAULTS, checked key by key against the defaults' shape. */
export function mergeSettings(given: unknown, where: string): SidecarSettings {
  if (!isMap(given))
    throw new WebhookConfigError(where, 'must hold a JSON object of sidecar settings');
  const defaults = DEFAULTS as unknown as Record<string, Json>;
  const merged = structuredClone(defaults);
  for (const [key, value] of Object.entries(given)) {
    const at = `${where}: ${key}`;
    if (!(key in defaults))
      throw new WebhookConfigError(
        at,
        `is not a sidecar setting (known: ${Object.keys(defaults).sort().join(', ')})`,
      );
    if (value === null && (key === 'maxUsers' || key === 'safetySkewMs')) {
      merged[key] = null;
      continue;
    }
    if ((GROUPS as readonly string[]).includes(key)) {
      if (!isMap(value)) throw new WebhookConfigError(at, 'must be an object');
      const group = merged[key] as Record<string, Json>;
      for (const [inner, item] of Object.entries(value)) {
        if (!(inner in group))
          throw new WebhookConfigError(
            `${at}.${inner}`,
            `is not a sidecar setting (known: ${Object.keys(group).sort().join(', ')})`,
          );
        expectType(`${at}.${inner}`, item, group[inner]!);
        group[inner] = item;
      }
      continue;
    }
    if (FREE_FORM.has(key)) {
      if (!isMap(value)) throw new WebhookConfigError(at, 'must be an object');
      merged[key] = value;
      continue;
    }
    expectType(at, value, defaults[key] ?? 0);
    merged[key] = value;
  }
  const settings = merged as unknown as SidecarSettings;
  if (!settings.brokerAddress)
    throw new WebhookConfigError(`${where}: brokerAddress`, 'is required');
  if (settings.socket) {
    // The same rule as the library chart's: the path goes into the probes' node -e script.
    if (
      !/^\/[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)+$/.test(settings.socket) ||
      settings.socket.length > 107 ||
      settings.socket.includes('/../')
    )
      throw new WebhookConfigError(
        `${where}: socket`,
        `must be an absolute file path in a directory (at most 107 bytes), got ${JSON.stringify(settings.socket)}`,
      );
    if (dirname(settings.socket) === settings.tokenDir.replace(/\/$/, ''))
      throw new WebhookConfigError(
        `${where}: socket`,
        'must not be in tokenDir (the module mounts that read-only)',
      );
  }
  const telemetry = settings.telemetry;
  if (telemetry.enabled && !telemetry.endpoint)
    throw new WebhookConfigError(
      `${where}: telemetry.endpoint`,
      'is required with telemetry.enabled',
    );
  if (!['grpc', 'http/protobuf', 'http/json'].includes(telemetry.protocol))
    throw new WebhookConfigError(
      `${where}: telemetry.protocol`,
      `must be grpc, http/protobuf or http/json, got ${JSON.stringify(telemetry.protocol)}`,
    );
  for (const name of Object.keys(settings.env)) {
    if (!name.startsWith('TB_SIDECAR_'))
      throw new WebhookConfigError(
        `${where}: env.${name}`,
        'only TB_SIDECAR_* variables belong here',
      );
    if (CHART_SET_VARIABLES.includes(name))
      throw new WebhookConfigError(`${where}: env.${name}`, 'has a settings key of its own');
  }
  return settings;
}

function expectType(at: string, value: unknown, like: Json): void {
  const want = Array.isArray(like) ? 'array' : like === null ? 'number' : typeof like;
  const got = Array.isArray(value) ? 'array' : typeof value;
  if (want !== got) throw new WebhookConfigError(at, `must be a ${want}, got ${got}`);
  if (Array.isArray(value) && value.some((v) => typeof v !== 'string'))
    throw new WebhookConfigError(at, 'must be a list of strings');
}

function isMap(value: unknown): value is Record<string, Json> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}
