/**
 * The running SDK of this process, when register.ts started one. Kept on globalThis: the --import
 * entry and the application may load this module through different loaders.
 */
import type { MetricReader } from '@opentelemetry/sdk-metrics';
import { telemetrySettings, type TelemetrySettings } from './telemetry-settings.js';

export interface TelemetryRuntime {
  readonly settings: TelemetrySettings;
  /**
   * A pull-only reader on the SDK's meter provider: what a process serves on its own /metrics
   * (the sidecar), beside whatever OTEL_METRICS_EXPORTER exports.
   */
  readonly localReader: MetricReader;
  /** Flushes and stops the SDK. */
  shutdown(): Promise<void>;
}

const KEY = Symbol.for('token-broker.telemetry-runtime');
type Holder = { [KEY]?: TelemetryRuntime };

export function installTelemetryRuntime(runtime: TelemetryRuntime): void {
  (globalThis as Holder)[KEY] = runtime;
}

export function telemetryRuntime(): TelemetryRuntime | undefined {
  return (globalThis as Holder)[KEY];
}

/**
 * Flushes what is pending and stops the SDK, never waiting past `timeoutMs`: an exporter retrying
 * an unreachable collector must not hold up a pod's termination. A no-op with telemetry off.
 */
export async function shutdownTelemetry(timeoutMs = 1_500): Promise<void> {
  const runtime = telemetryRuntime();
  if (!runtime) return;
  delete (globalThis as Holder)[KEY];
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, timeoutMs);
    timer.unref();
  });
  await Promise.race([runtime.shutdown().catch(() => undefined), timeout]);
  clearTimeout(timer);
}

/**
 * For the start-up log line: whether telemetry runs, and why. `missingImport` is true when the
 * variables ask for telemetry but the process was started without the --import entry.
 */
export function telemetryStatus(): {
  telemetry: 'on' | 'off';
  reason: string;
  missingImport: boolean;
} {
  const runtime = telemetryRuntime();
  if (runtime) return { telemetry: 'on', reason: runtime.settings.reason, missingImport: false };
  let wanted = false;
  let reason: string;
  try {
    const settings = telemetrySettings();
    wanted = settings.enabled;
    reason = settings.reason;
  } catch (err) {
    reason = err instanceof Error ? err.message : String(err);
  }
  return { telemetry: 'off', reason, missingImport: wanted };
}
