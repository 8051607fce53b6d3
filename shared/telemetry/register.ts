/**
 * The --import entry of both processes: `node --import ./shared/telemetry/register.ts main.ts`
 * (or dist/shared/telemetry/register.js in the image). With telemetry on (see
 * telemetry-settings.ts) it registers the ESM loader hook, enables the auto-instrumentations and
 * starts the SDK before the application's first import; with telemetry off it loads nothing.
 *
 * Order matters: the hook only wraps modules that instrumentations have asked for by the time
 * they are first imported, and the SDK's own imports already load @grpc/grpc-js.
 */
import { register } from 'node:module';
import { installTelemetryRuntime } from './telemetry-runtime.js';
import { TelemetrySettingError, telemetrySettings } from './telemetry-settings.js';

let settings;
try {
  settings = telemetrySettings();
} catch (err) {
  if (!(err instanceof TelemetrySettingError)) throw err;
  process.stderr.write(
    `${JSON.stringify({ level: 60, setting: err.setting, msg: `configuration error: ${err.message}` })}\n`,
  );
  process.exit(2);
}

if (settings.enabled) {
  // Loaded only when telemetry is on: with it off, the entry costs the start-up nothing.
  const { createAddHookMessageChannel } = await import('import-in-the-middle');
  const { registerOptions, waitForAllMessagesAcknowledged } = createAddHookMessageChannel();
  register('@opentelemetry/instrumentation/hook.mjs', import.meta.url, registerOptions);
  const { createInstrumentations } = await import('./instrumentations.js');
  const instrumentations = createInstrumentations(settings.clientSpans);
  await waitForAllMessagesAcknowledged();
  const { startTelemetrySdk } = await import('./telemetry-sdk.js');
  installTelemetryRuntime(startTelemetrySdk(settings, instrumentations));
}
