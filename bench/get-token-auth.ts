/**
 * GetToken calls/s of one broker with caller authentication on beside the same broker with it
 * off (TB_AUTH=off), in the same run, both over TLS: the cost of verifying the caller's
 * ServiceAccount token and checking the policy on every call (target: at least 0.9 of off).
 * Prints figures; never passes or fails on them. Everything runs on 127.0.0.1 and stops by itself.
 *
 *   make bench   (BENCH_ROUNDS, default 3, of BENCH_SECONDS, default 5, per broker;
 *                 BENCH_CONCURRENCY, default 64 calls in flight)
 *
 * Set-up: the in-process OIDC provider, two embedded-mode broker processes (the dev cluster's TLS
 * material on both, its issuer keys and policy on one), one enrolled user each, a client here on
 * one channel per broker. Rounds alternate on, off, on, off..., so drift hits both alike; each
 * broker's CPU time per call comes from /proc.
 */
import { performance } from 'node:perf_hooks';
import { cpuSeconds } from './lib/proc.js';
import { BrokerClient } from '../scripts/dev/broker-client.js';
import { brokerEnv } from '../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../scripts/dev/broker-process.js';
import { startOidcProvider } from '../scripts/dev/oidc-provider.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? 64);

/** `CONCURRENCY` loops of GetToken for `ms`; returns completed calls and failures. */
async function load(client: BrokerClient, ms: number): Promise<{ calls: number; failed: number }> {
  const until = performance.now() + ms;
  let calls = 0;
  let failed = 0;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (performance.now() < until) {
        try {
          await client.getToken('diku', 'bench');
          calls++;
        } catch {
          failed++;
        }
      }
    }),
  );
  return { calls, failed };
}

const oidc = await startOidcProvider({ accessTokenTtlSeconds: 3_600 });
const brokers: { name: string; broker: BrokerProcess; client: BrokerClient }[] = [];
try {
  for (const [name, extra] of [
    ['auth on', {}],
    ['auth off', { TB_AUTH: 'off', TB_AUTH_ISSUER: '', TB_AUTH_JWKS_FILE: '', TB_POLICY_FILE: '' }],
  ] as const) {
    const broker = await startBrokerProcess(
      brokerEnv(oidc, undefined, { ...extra, TB_LOG_LEVEL: 'warn' }),
    );
    const client = new BrokerClient(broker.address);
    await client.enroll(
      'diku',
      'bench',
      (await oidc.mintTokens(`bench-${brokers.length}`)).refresh_token,
    );
    brokers.push({ name, broker, client });
  }
  for (const b of brokers) await load(b.client, 1_000); // warm-up (JIT, token cache)
  const totals = new Map(brokers.map((b) => [b.name, { calls: 0, failed: 0, seconds: 0, cpu: 0 }]));
  for (let round = 0; round < ROUNDS; round++)
    for (const b of brokers) {
      const cpu = cpuSeconds(b.broker.pid);
      const started = performance.now();
      const r = await load(b.client, SECONDS * 1_000);
      const t = totals.get(b.name)!;
      t.seconds += (performance.now() - started) / 1_000;
      t.calls += r.calls;
      t.failed += r.failed;
      t.cpu += cpuSeconds(b.broker.pid) - cpu;
    }
  const rate = (name: string) => totals.get(name)!.calls / totals.get(name)!.seconds;
  console.log(`GetToken over TLS, ${CONCURRENCY} calls in flight, ${ROUNDS} x ${SECONDS} s each:`);
  for (const [name, t] of totals)
    console.log(
      `  ${name.padEnd(9)} ${Math.round(t.calls / t.seconds)
        .toString()
        .padStart(
          6,
        )} calls/s  ${((t.cpu / Math.max(1, t.calls)) * 1e6).toFixed(0)} us broker CPU/call  ${t.failed} failed`,
    );
  console.log(
    `  ratio on/off: ${(rate('auth on') / rate('auth off')).toFixed(2)} (target >= 0.90)`,
  );
} finally {
  for (const b of brokers) {
    b.client.close();
    await b.broker.stop();
  }
  await oidc.close();
}
