import { pino } from 'pino';
import { startBroker } from './broker-app.js';
import { loadConfig } from './config.js';
import { ConfigError } from './errors.js';

const log = pino({ name: 'token-broker', level: process.env.TB_LOG_LEVEL ?? 'info' });

try {
  const config = loadConfig();
  const broker = await startBroker(config, log);
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    if (++signals > 1) process.exit(1);
    log.info({ signal }, 'shutting down');
    broker.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err: String(err) }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
} catch (err) {
  if (err instanceof ConfigError) {
    log.fatal({ setting: err.setting }, `configuration error: ${err.message}`);
    process.exit(2);
  }
  log.fatal({ err: err instanceof Error ? err.message : String(err) }, 'broker failed to start');
  process.exit(1);
}
