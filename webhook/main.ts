import { pino } from 'pino';
import { stopOnSignals } from '../shared/stop-on-signals.js';
import { loadWebhookConfig } from './config.js';
import { WebhookError } from './errors.js';
import { startWebhook } from './webhook-server.js';

const log = pino({
  name: 'token-broker-webhook',
  level: process.env.TB_WEBHOOK_LOG_LEVEL?.trim() || 'info',
});

try {
  const config = loadWebhookConfig();
  log.level = config.logLevel;
  const webhook = await startWebhook(config, log);
  log.info(
    { port: webhook.port, namespace: config.namespace, broker: config.sidecar.brokerAddress },
    'webhook serving',
  );
  stopOnSignals(() => webhook.stop(), log);
} catch (err) {
  if (err instanceof WebhookError) {
    log.fatal({ setting: err.setting }, `configuration error: ${err.message}`);
    process.exit(2);
  }
  log.fatal({ err: String(err) }, 'webhook failed to start');
  process.exit(1);
}
