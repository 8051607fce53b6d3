/**
 * GET-token throughput of the sidecar next to a bare node:http server returning a constant of
 * the same size, measured in the same run with the same keep-alive load generator. Prints
 * figures; never passes or fails on them. Everything runs on 127.0.0.1 and stops by itself.
 *
 *   make bench   (BENCH_ROUNDS, default 3, of BENCH_SECONDS, default 5, per server;
 *                 BENCH_CONNECTIONS, default 16)
 *
 * Set-up: the in-process OIDC provider, one embedded-mode broker process, one sidecar process
 * holding the token of one user. After a warm-up of each, measurements alternate bare, sidecar,
 * bare, sidecar..., so drift on a shared machine hits both alike. Besides req/s it prints each
 * server's CPU time per request (from /proc), which other load on the machine disturbs less.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { cpuSeconds } from './lib/proc.js';
import { BrokerClient } from '../scripts/dev/broker-client.js';
import { brokerEnv } from '../scripts/dev/broker-env.js';
import { startBrokerProcess } from '../scripts/dev/broker-process.js';
import { startOidcProvider } from '../scripts/dev/oidc-provider.js';
import { startSidecarProcess, TOKEN_HEADER } from '../scripts/dev/sidecar-process.js';
import { percentile, runLoad, type LoadResult } from './lib/load-generator.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const CONNECTIONS = Number(process.env.BENCH_CONNECTIONS ?? 16);
const ROOT = fileURLToPath(new URL('..', import.meta.url));

async function startBare(body: string): Promise<{ port: number; pid: number; stop: () => void }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'bench/lib/bare-server.ts', body], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout.once('data', (chunk: Buffer) => resolve(Number(chunk.toString().trim())));
    child.once('exit', (code) => reject(new Error(`bare server exited with ${code}`)));
  });
  return { port, pid: child.pid!, stop: () => child.kill('SIGTERM') };
}

function row(name: string, r: LoadResult): string {
  const rps = r.requests / r.seconds;
  return [
    name.padEnd(22),
    rps.toFixed(0).padStart(9),
    percentile(r.latencies, 50).toFixed(3).padStart(9),
    percentile(r.latencies, 99).toFixed(3).padStart(9),
    String(r.non200).padStart(8),
  ].join('');
}

function merge(results: LoadResult[]): LoadResult {
  const latencies = new Float64Array(results.reduce((n, r) => n + r.latencies.length, 0));
  let offset = 0;
  for (const r of results) {
    latencies.set(r.latencies, offset);
    offset += r.latencies.length;
  }
  return {
    requests: results.reduce((n, r) => n + r.requests, 0),
    non200: results.reduce((n, r) => n + r.non200, 0),
    seconds: results.reduce((n, r) => n + r.seconds, 0),
    latencies: latencies.sort(),
  };
}

const oidc = await startOidcProvider({ accessTokenTtlSeconds: 3_600 });
const broker = await startBrokerProcess(brokerEnv(oidc));
const client = new BrokerClient(broker.address);
await client.enroll('diku', 'bench', (await oidc.mintTokens('bench')).refresh_token);
client.close();
const sidecar = await startSidecarProcess({
  TB_SIDECAR_BROKER_ADDRESS: broker.address,
  TB_SIDECAR_USERS: 'diku/bench',
  TB_SIDECAR_LOG_LEVEL: 'info',
});
const probe = await sidecar.token('diku', 'bench', { wait: 10_000 });
if (probe.status !== 200) throw new Error(`the sidecar answered ${probe.status}`);
// The baseline answers a constant as long as the sidecar's JSON answer.
const bodySize = (await probe.text()).length;
const bare = await startBare(JSON.stringify({ v: 'x'.repeat(Math.max(0, bodySize - 8)) }));

const targets = [
  { name: 'bare node:http', pid: bare.pid, port: bare.port, path: '/' },
  { name: 'sidecar', pid: sidecar.pid, port: sidecar.port!, path: '/v1/tokens/diku/bench' },
];
const results = new Map<string, LoadResult[]>(targets.map((t) => [t.name, []]));
const cpu = new Map<string, number>(targets.map((t) => [t.name, 0]));
try {
  for (const t of targets)
    await runLoad({ ...t, headers: TOKEN_HEADER, connections: CONNECTIONS, durationMs: 1_000 });
  for (let round = 0; round < ROUNDS; round++)
    for (const t of targets) {
      const before = cpuSeconds(t.pid);
      const result = await runLoad({
        ...t,
        headers: TOKEN_HEADER,
        connections: CONNECTIONS,
        durationMs: SECONDS * 1_000,
      });
      cpu.set(t.name, cpu.get(t.name)! + cpuSeconds(t.pid) - before);
      results.get(t.name)!.push(result);
    }
} finally {
  bare.stop();
  await sidecar.stop();
  await broker.stop();
  await oidc.close();
}

const merged = targets.map((t) => ({ ...t, all: merge(results.get(t.name)!) }));
const rps = (r: LoadResult) => r.requests / r.seconds;
console.log(
  `GET-token throughput: ${CONNECTIONS} keep-alive connections, ${ROUNDS} x ${SECONDS} s per ` +
    `server, ${bodySize}-byte answers`,
);
console.log(
  `${'server'.padEnd(22)}${'req/s'.padStart(9)}${'p50 ms'.padStart(9)}${'p99 ms'.padStart(9)}` +
    `${'non-200'.padStart(8)}${'CPU us/req'.padStart(12)}`,
);
for (const t of merged)
  console.log(
    `${row(t.name, t.all)}${((cpu.get(t.name)! / t.all.requests) * 1e6).toFixed(1).padStart(12)}`,
  );
const [bareAll, sidecarAll] = merged.map((t) => t.all) as [LoadResult, LoadResult];
console.log(
  `sidecar / bare throughput: ${(rps(sidecarAll) / rps(bareAll)).toFixed(2)} (target >= 0.80)`,
);
