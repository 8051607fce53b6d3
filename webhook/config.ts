/**
 * The webhook's configuration, read once from TB_WEBHOOK_* variables and validated at start-up
 * (README, "Sidecar injection"). Every error names its variable.
 */
import { EnvReader, type Env } from '../shared/env-reader.js';
import { LOG_LEVELS, type LogLevel } from '../sidecar/config.js';
import { WebhookConfigError } from './errors.js';
import { readSidecarSettings } from './sidecar-settings.js';
import type { SidecarSettings } from './sidecar-spec.js';

export interface WebhookConfig {
  host: string;
  /** 0 picks a free port (logged). */
  port: number;
  certFile: string;
  keyFile: string;
  /** Pods of this namespace are never injected (the broker's and the webhook's own). */
  namespace: string;
  sidecar: SidecarSettings;
  logLevel: LogLevel;
}

const WEBHOOK_VARIABLES = [
  'TB_WEBHOOK_HOST',
  'TB_WEBHOOK_PORT',
  'TB_WEBHOOK_TLS_CERT_FILE',
  'TB_WEBHOOK_TLS_KEY_FILE',
  'TB_WEBHOOK_NAMESPACE',
  'TB_WEBHOOK_SIDECAR_FILE',
  'TB_WEBHOOK_LOG_LEVEL',
];

export function loadWebhookConfig(env: Env = process.env): WebhookConfig {
  for (const name of Object.keys(env))
    if (name.startsWith('TB_WEBHOOK_') && !WEBHOOK_VARIABLES.includes(name))
      throw new WebhookConfigError(
        name,
        `is not a webhook setting (known: ${WEBHOOK_VARIABLES.join(', ')})`,
      );
  const read = new EnvReader(env, (setting, problem) => new WebhookConfigError(setting, problem));
  return {
    host: read.string('TB_WEBHOOK_HOST') ?? '0.0.0.0',
    port: read.int('TB_WEBHOOK_PORT', 8443, { min: 0, max: 65_535 }),
    certFile: read.required('TB_WEBHOOK_TLS_CERT_FILE'),
    keyFile: read.required('TB_WEBHOOK_TLS_KEY_FILE'),
    namespace: read.required('TB_WEBHOOK_NAMESPACE'),
    sidecar: readSidecarSettings(read.required('TB_WEBHOOK_SIDECAR_FILE')),
    logLevel: read.oneOf('TB_WEBHOOK_LOG_LEVEL', LOG_LEVELS, 'info'),
  };
}
