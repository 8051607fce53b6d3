import { pino } from 'pino';
import { traceLogFields } from '../shared/telemetry/log-mixin.js';
import { stopOnSignals } from '../shared/stop-on-signals.js';
import { telemetryStatus } from '../shared/telemetry/telemetry-runtime.js';
import { startBroker } from './broker-app.js';
import { loadConfig, LOG_LEVELS, type LogLevel } from './config.js';
import { ConfigError, PolicyError } from './errors.js';

const requested = process.env.TB_LOG_LEVEL?.trim() ?? '';
// pino throws on an unknown level; a bad one is reported by the config check, through this logger.
const level: LogLevel = (LOG_LEVELS as readonly string[]).includes(requested)
  ? (requested as LogLevel)
  : 'info';
const log = pino({ name: 'token-broker', level, mixin: traceLogFields });

try {
  const config = loadConfig();
  const status = telemetryStatus();
  if (status.missingImport)
    log.warn(
      'OTEL_* variables ask for telemetry but the broker was not started with ' +
        '--import of shared/telemetry/register: telemetry is off',
    );
  else log.info({ telemetry: status.telemetry, reason: status.reason }, 'telemetry');
  const broker = await startBroker(config, log);
  stopOnSignals(() => broker.stop(), log);
} catch (err) {
  if (err instanceof ConfigError) {
    log.fatal({ setting: err.setting }, `configuration error: ${err.message}`);
    process.exit(2);
  }
  if (err instanceof PolicyError) {
    log.fatal(
      { setting: 'TB_POLICY_FILE', line: err.line, field: err.field },
      `policy error: ${err.message}`,
    );
    process.exit(2);
  }
  log.fatal({ err: err instanceof Error ? err.message : String(err) }, 'broker failed to start');
  process.exit(1);
}
