/**
 * The admission webhook (webhook/main.ts) as a real child process on 127.0.0.1, and a client that
 * posts AdmissionReviews to it over HTTPS as the API server does (verifying the served certificate
 * against a CA bundle and a Service name).
 */
import { request } from 'node:https';
import { spawnNodeProcess, waitForLog, type NodeProcess } from './node-process.js';

export interface WebhookProcess {
  proc: NodeProcess;
  port: number;
  stop(): Promise<number | null>;
}

export async function startWebhookProcess(env: Record<string, string>): Promise<WebhookProcess> {
  const proc = spawnNodeProcess('webhook/main.ts', {
    TB_WEBHOOK_HOST: '127.0.0.1',
    TB_WEBHOOK_PORT: '0',
    ...env,
  });
  const serving = await waitForLog(proc, 'webhook', (entry) => entry.msg === 'webhook serving');
  return { proc, port: serving.port as number, stop: () => proc.stop() };
}

export interface WebhookReply {
  status: number;
  body: unknown;
}

/** POST /mutate; `ca` and `serverName` as a MutatingWebhookConfiguration gives them. */
export function postReview(
  port: number,
  review: unknown,
  tls: { ca: string; serverName: string },
  path = '/mutate',
): Promise<WebhookReply> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port,
        path,
        method: 'POST',
        ca: tls.ca,
        servername: tls.serverName,
        // A new connection each time: a kept-alive one would hide a changed certificate.
        agent: false,
        headers: { 'content-type': 'application/json' },
        timeout: 10_000,
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
        res.on('end', () => {
          try {
            resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) });
          } catch {
            resolve({ status: res.statusCode ?? 0, body: text });
          }
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error('webhook did not answer in 10 s')));
    req.on('error', reject);
    req.end(JSON.stringify(review));
  });
}
