/**
 * GET-token throughput of the sidecar next to a bare node:http server returning a constant of
 * the same size, measured in the same run with the same keep-alive load generator, both over
 * plain HTTP on 127.0.0.1 (the sidecar's transport): the ratio is the sidecar's own work. Two
 * cases: one user read over and over, and BENCH_USERS (default 2,000) users held by one sidecar
 * and read round robin (the bare server gets the same cycle of paths). Beside them, the RSS of
 * both sidecars against the chart's sidecar memory limit (128Mi; target < 60% of it). Prints
 * figures; never passes or fails on them. Everything runs on 127.0.0.1 and stops by itself.
 *
 *   make bench BENCH=sidecar-throughput   (BENCH_ROUNDS, default 3, of BENCH_SECONDS, default 5,
 *                                          per server; BENCH_CONNECTIONS, default 16; BENCH_USERS;
 *                                          BENCH_SIDECAR_NODE_FLAGS, '' for V8's defaults)
 *
 * The sidecars get the heap the image gives them in the chart's 128Mi container: the image sets
 * --max-old-space-size-percentage=50 --max-semi-space-size=8, and Node.js applies the percentage
 * to the cgroup limit; this machine has no such limit, so the same old space is passed as
 * --max-old-space-size=64 (half of 128 MiB).
 *
 * Set-up: the fast IdP (scripts/dev/fast-idp.ts), one compiled embedded-mode broker process with
 * TLS and caller authentication on, BENCH_USERS users enrolled through gRPC, and two compiled
 * sidecar processes (dist/, as the image runs them) with the dev cluster identity: one holding one
 * user, one holding all of them (TB_SIDECAR_USERS). After a warm-up of each, measurements
 * alternate bare, sidecar, bare, sidecar..., so drift on a shared machine hits both alike. Besides
 * req/s it prints each server's CPU time per request (from /proc), which other load on the machine
 * disturbs less.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { cpuSeconds, MiB, peakRssBytes, rssBytes } from './lib/proc.js';
import { fmt, printTable, type Row } from './lib/report.js';
import { BrokerClient } from '../scripts/dev/broker-client.js';
import { brokerEnv } from '../scripts/dev/broker-env.js';
import { startBrokerProcess } from '../scripts/dev/broker-process.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';
import { startSidecarProcess, TOKEN_HEADER } from '../scripts/dev/sidecar-process.js';
import { percentile, runLoad, type LoadResult } from './lib/load-generator.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const CONNECTIONS = Number(process.env.BENCH_CONNECTIONS ?? 16);
const USERS = Number(process.env.BENCH_USERS ?? 2_000);
const SIDECAR_FLAGS = (
  process.env.BENCH_SIDECAR_NODE_FLAGS ?? '--max-old-space-size=64 --max-semi-space-size=8'
)
  .split(' ')
  .filter((flag) => flag !== '');
/** deploy/helm/token-broker/values.yaml: sidecar.resources.limits.memory. */
const CHART_LIMIT = 128 * MiB;
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const TENANT = 'diku';
const pathOf = (i: number) => `/v1/tokens/${TENANT}/user-${i}`;

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

interface Target {
  name: string;
  pid: number;
  port: number;
  path: string;
  paths?: readonly string[];
}

/** Warm-up, then ROUNDS alternating rounds of each target; merged results and CPU per target. */
async function measure(targets: readonly Target[]) {
  const results = new Map<string, LoadResult[]>(targets.map((t) => [t.name, []]));
  const cpu = new Map<string, number>(targets.map((t) => [t.name, 0]));
  const load = (t: Target, durationMs: number) =>
    runLoad({ ...t, headers: TOKEN_HEADER, connections: CONNECTIONS, durationMs });
  for (const t of targets) await load(t, 1_000);
  for (let round = 0; round < ROUNDS; round++)
    for (const t of targets) {
      const before = cpuSeconds(t.pid);
      results.get(t.name)!.push(await load(t, SECONDS * 1_000));
      cpu.set(t.name, cpu.get(t.name)! + cpuSeconds(t.pid) - before);
    }
  return targets.map((t) => {
    const all = merge(results.get(t.name)!);
    return { name: t.name, all, cpuUs: (cpu.get(t.name)! / all.requests) * 1e6 };
  });
}

const idp = await startFastIdp({ accessTtlSeconds: 3_600 });
const broker = await startBrokerProcess(brokerEnv(idp, undefined, { TB_LOG_LEVEL: 'warn' }), {
  compiled: true,
});
const rows: Row[] = [];
let bodySize = 0;
try {
  const client = new BrokerClient(broker.address);
  const tokens = await idp.mint(USERS);
  for (let i = 0; i < USERS; i += 100)
    await Promise.all(
      tokens.slice(i, i + 100).map((rt, j) => client.enroll(TENANT, `user-${i + j}`, rt)),
    );
  client.close();
  const users = Array.from({ length: USERS }, (_, i) => `${TENANT}/user-${i}`);
  const one = await startSidecarProcess(
    { TB_SIDECAR_BROKER_ADDRESS: broker.address, TB_SIDECAR_USERS: users[0]! },
    { compiled: true, nodeFlags: SIDECAR_FLAGS },
  );
  const many = await startSidecarProcess(
    {
      TB_SIDECAR_BROKER_ADDRESS: broker.address,
      TB_SIDECAR_USERS: users.join(','),
      TB_SIDECAR_MAX_USERS: String(USERS),
    },
    { compiled: true, nodeFlags: SIDECAR_FLAGS },
  );
  try {
    const probe = await one.token(TENANT, 'user-0', { wait: 10_000 });
    if (probe.status !== 200) throw new Error(`the sidecar answered ${probe.status}`);
    bodySize = (await probe.text()).length;
    for (let i = 0; i < USERS; i += 100)
      await Promise.all(
        Array.from({ length: Math.min(100, USERS - i) }, async (_, j) => {
          const res = await many.token(TENANT, `user-${i + j}`, { wait: 10_000 });
          await res.arrayBuffer();
          if (res.status !== 200) throw new Error(`the sidecar answered ${res.status}`);
        }),
      );
    const rssHeld = rssBytes(many.pid);
    // The baseline answers a constant as long as the sidecar's JSON answer.
    const bare = await startBare(JSON.stringify({ v: 'x'.repeat(Math.max(0, bodySize - 8)) }));
    try {
      const paths = Array.from({ length: USERS }, (_, i) => pathOf(i));
      const [bare1, side1] = await measure([
        { name: 'bare', pid: bare.pid, port: bare.port, path: '/' },
        { name: 'sidecar', pid: one.pid, port: one.port!, path: pathOf(0) },
      ]);
      const [bareN, sideN] = await measure([
        { name: 'bare', pid: bare.pid, port: bare.port, path: '/', paths },
        { name: 'sidecar', pid: many.pid, port: many.port!, path: pathOf(0), paths },
      ]);
      const rps = (r: LoadResult) => r.requests / r.seconds;
      const lat = (r: LoadResult) =>
        `p50 ${fmt.ms(percentile(r.latencies, 50))}, p99 ${fmt.ms(percentile(r.latencies, 99))}`;
      for (const [label, bareR, sideR] of [
        ['1 user', bare1!, side1!],
        [`${USERS} users round robin`, bareN!, sideN!],
      ] as const)
        rows.push(
          {
            what: `sidecar GET, ${label} (target >= 0.85)`,
            value: fmt.rate(rps(sideR.all)),
            baseline: `bare node:http ${fmt.rate(rps(bareR.all))}`,
            ratio: rps(sideR.all) / rps(bareR.all),
          },
          { what: '  latency', value: lat(sideR.all), baseline: lat(bareR.all) },
          {
            what: '  server CPU per request',
            value: fmt.us(sideR.cpuUs),
            baseline: fmt.us(bareR.cpuUs),
            ratio: sideR.cpuUs / bareR.cpuUs,
          },
          {
            what: '  non-200 answers',
            value: String(sideR.all.non200),
            baseline: String(bareR.all.non200),
          },
        );
      rows.push(
        {
          what: `sidecar RSS, ${USERS} users held (target < 0.60)`,
          value: `${fmt.mib(rssHeld)} before load, ${fmt.mib(rssBytes(many.pid))} after, peak ${fmt.mib(peakRssBytes(many.pid))}`,
          baseline: `chart limit ${fmt.mib(CHART_LIMIT)}`,
          ratio: peakRssBytes(many.pid) / CHART_LIMIT,
        },
        {
          what: 'sidecar RSS, 1 user',
          value: `${fmt.mib(rssBytes(one.pid))}, peak ${fmt.mib(peakRssBytes(one.pid))}`,
          baseline: `chart limit ${fmt.mib(CHART_LIMIT)}`,
          ratio: peakRssBytes(one.pid) / CHART_LIMIT,
        },
        {
          what: 'bare node:http RSS',
          value: `${fmt.mib(rssBytes(bare.pid))}, peak ${fmt.mib(peakRssBytes(bare.pid))}`,
        },
      );
    } finally {
      bare.stop();
    }
  } finally {
    await one.stop();
    await many.stop();
  }
} finally {
  await broker.stop();
  await idp.stop();
}
printTable(
  `Sidecar GET throughput (compiled sidecars, ${SIDECAR_FLAGS.join(' ') || "V8's default heap"}; ` +
    `${CONNECTIONS} keep-alive connections, ` +
    `${ROUNDS} x ${SECONDS} s per server, ${bodySize}-byte answers; ratio: sidecar / bare)`,
  rows,
);
