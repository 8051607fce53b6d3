/**
 * The HTTPS server the API server calls: POST /mutate with an AdmissionReview, GET /healthz for
 * the kubelet. The certificate and key are re-read when they change (cert-manager renews them in
 * place), so a renewal needs no restart; a broken pair keeps the last good one.
 */
import { readFileSync, statSync } from 'node:fs';
import type { Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { createSecureContext } from 'node:tls';
import type { Logger } from 'pino';
import { https } from '../shared/node-http.js';
import { BadReviewError, review } from './admission.js';
import type { WebhookConfig } from './config.js';
import { WebhookConfigError } from './errors.js';

/** The API server sends at most 3 MiB objects; a review wraps one (twice for updates). */
const MAX_BODY_BYTES = 8 * 1024 * 1024;
const RELOAD_CHECK_MS = 30_000;

export interface RunningWebhook {
  port: number;
  stop(): Promise<void>;
}

export interface WebhookOptions {
  /** How often the certificate files' mtimes are compared (tests shorten it). */
  reloadCheckMs?: number;
}

export async function startWebhook(
  config: WebhookConfig,
  log: Logger,
  options: WebhookOptions = {},
): Promise<RunningWebhook> {
  const pair = readPair(config);
  let stamp = stampOf(config);
  const server: Server = https.createServer({ ...pair, minVersion: 'TLSv1.2' }, (req, res) => {
    const reply = (status: number, body: object) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    const path = (req.url ?? '').split('?')[0];
    if (req.method === 'GET' && path === '/healthz') return reply(200, { status: 'ok' });
    if (path !== '/mutate') return reply(404, { error: 'not found' });
    if (req.method !== 'POST') return reply(405, { error: 'POST only' });
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reply(413, { error: `request body over ${MAX_BODY_BYTES} bytes` });
        req.destroy();
      } else chunks.push(chunk);
    });
    req.on('end', () => {
      if (size > MAX_BODY_BYTES) return;
      let body: unknown;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      } catch {
        return reply(400, { error: 'the body is not JSON' });
      }
      try {
        const { response, outcome } = review(body, {
          settings: config.sidecar,
          ownNamespace: config.namespace,
        });
        const request = (
          body as {
            request: {
              namespace?: string;
              name?: string;
              object?: { metadata?: { generateName?: string } };
            };
          }
        ).request;
        log.info(
          {
            namespace: request.namespace,
            pod: request.name || request.object?.metadata?.generateName,
            outcome: outcome.kind,
            ...(outcome.kind === 'skipped' ? { reason: outcome.reason } : {}),
            ...(outcome.kind === 'refused' ? { reason: outcome.message } : {}),
          },
          'admission review',
        );
        reply(200, response);
      } catch (err) {
        if (err instanceof BadReviewError) return reply(400, { error: err.message });
        log.error({ err: String(err) }, 'admission review failed');
        reply(500, { error: 'internal error' });
      }
    });
  });
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;

  const reload = setInterval(() => {
    const now = stampOf(config);
    if (now === stamp) return;
    try {
      server.setSecureContext(readPair(config));
      stamp = now;
      log.info('webhook certificate reloaded');
    } catch (err) {
      log.warn(
        { err: String(err) },
        'webhook certificate files unusable: keeping the last good pair',
      );
    }
  }, options.reloadCheckMs ?? RELOAD_CHECK_MS);
  reload.unref();

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.port, config.host, () => resolve());
  });
  return {
    port: (server.address() as AddressInfo).port,
    stop: () =>
      new Promise<void>((resolve) => {
        clearInterval(reload);
        server.close(() => resolve());
        server.closeIdleConnections();
      }),
  };
}

function readPair(config: WebhookConfig): { cert: Buffer; key: Buffer } {
  let cert: Buffer, key: Buffer;
  try {
    cert = readFileSync(config.certFile);
  } catch (err) {
    throw new WebhookConfigError(
      'TB_WEBHOOK_TLS_CERT_FILE',
      `(${config.certFile}) cannot be read: ${(err as Error).message}`,
    );
  }
  try {
    key = readFileSync(config.keyFile);
  } catch (err) {
    throw new WebhookConfigError(
      'TB_WEBHOOK_TLS_KEY_FILE',
      `(${config.keyFile}) cannot be read: ${(err as Error).message}`,
    );
  }
  try {
    createSecureContext({ cert, key });
  } catch (err) {
    throw new WebhookConfigError(
      'TB_WEBHOOK_TLS_CERT_FILE',
      `and TB_WEBHOOK_TLS_KEY_FILE are no matching PEM pair: ${(err as Error).message}`,
    );
  }
  return { cert, key };
}

function stampOf(config: WebhookConfig): string {
  try {
    return [config.certFile, config.keyFile].map((f) => statSync(f).mtimeMs).join(':');
  } catch {
    return 'missing';
  }
}
