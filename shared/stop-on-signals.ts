import type { Logger } from 'pino';
import { shutdownTelemetry } from './telemetry/telemetry-runtime.js';

/**
 * SIGTERM or SIGINT stops the process gracefully (`stop`, then a bounded telemetry flush) and
 * exits 0, or 1 if stopping failed; a second signal exits at once.
 */
export function stopOnSignals(stop: () => Promise<void>, log: Logger): void {
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    if (++signals > 1) process.exit(1);
    log.info({ signal }, 'shutting down');
    stop()
      .then(() => shutdownTelemetry())
      .then(
        () => process.exit(0),
        (err: unknown) => {
          log.error({ err: String(err) }, 'shutdown failed');
          process.exit(1);
        },
      );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}
