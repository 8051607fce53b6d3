import { pino } from 'pino';
import { traceLogFields } from '../shared/telemetry/log-mixin.js';
import { stopOnSignals } from '../shared/stop-on-signals.js';
import { telemetryStatus } from '../shared/telemetry/telemetry-runtime.js';
import { loadSidecarConfig, LOG_LEVELS, type LogLevel } from './config.js';
import { TlsFileError } from '../shared/watched-tls-files.js';
import { ConfigError } from './errors.js';
import { startSidecar } from './sidecar-app.js';

const requested = process.env.TB_SIDECAR_LOG_LEVEL?.trim() ?? '';
// A bad level is reported by the config check below, through a logger that works.
const level: LogLevel = (LOG_LEVELS as readonly string[]).includes(requested)
  ? (requested as LogLevel)
  : 'info';
const log = pino({ name: 'token-broker-sidecar', level, mixin: traceLogFields });

try {
  const config = loadSidecarConfig();
  const status = telemetryStatus();
  if (status.missingImport)
    log.warn(
      'OTEL_* variables ask for telemetry but the sidecar was not started with ' +
        '--import of shared/telemetry/register: telemetry is off',
    );
  else log.info({ telemetry: status.telemetry, reason: status.reason }, 'telemetry');
  const sidecar = await startSidecar(config, log);
  log.info(
    {
      port: sidecar.port,
      socket: sidecar.socketPath,
      broker: config.brokerAddress,
      users: config.users.length,
      tokenDir: config.tokenDir,
    },
    'sidecar serving',
  );
  stopOnSignals(() => sidecar.stop(), log);
} catch (err) {
  if (err instanceof ConfigError || err instanceof TlsFileError) {
    log.fatal({ setting: err.setting }, `configuration error: ${err.message}`);
    process.exit(2);
  }
  log.fatal({ err: err instanceof Error ? err.message : String(err) }, 'sidecar failed to start');
  process.exit(1);
}
