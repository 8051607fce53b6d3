/**
 * Start to listening: the time from spawning a process to its 'serving' log line (its port
 * bound), for the broker and the sidecar, compiled (what the images and `npm start` run: the
 * broker's bundle in dist/bin/, the sidecar's tsc output) and through tsx (what most tests run),
 * beside a bare node:http server started the same way: the baseline is Node.js's own start plus
 * a listen, so the difference is the project's own start-up.
 * BENCH_RUNS (default 7) runs of each, interleaved so drift hits all alike; the median is printed.
 * Prints figures; never passes or fails on them. Everything runs on 127.0.0.1 and stops by itself.
 *
 *   make bench BENCH=startup   (BENCH_RUNS, default 7)
 *
 * Brokers run in Redis mode (one state node, one Redlock node), with TLS and caller
 * authentication on, as in a cluster, so start-up includes connecting to Redis. Sidecars connect
 * to an embedded broker with the dev cluster identity; their 'serving' line comes once their HTTP
 * port is bound. Telemetry is off (no OTEL_* variables), as the chart's default.
 */
import { spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { percentileOf, fmt, printTable, type Row } from './lib/report.js';
import { brokerEnv, redisTopology } from '../scripts/dev/broker-env.js';
import { startBrokerProcess } from '../scripts/dev/broker-process.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';
import { startRedisNodes } from '../scripts/dev/redis-nodes.js';
import { startSidecarProcess } from '../scripts/dev/sidecar-process.js';

const RUNS = Number(process.env.BENCH_RUNS ?? 7);

const BARE = `
const server = require('node:http').createServer((_q, s) => s.end('ok'));
server.listen(0, '127.0.0.1', () => process.stdout.write(server.address().port + '\\n'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));`;

async function bare(): Promise<number> {
  const start = performance.now();
  const child = spawn(process.execPath, ['-e', BARE], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`bare server exited with ${code}`)));
  });
  const ms = performance.now() - start;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
  return ms;
}

async function timed(start: () => Promise<{ stop(): Promise<unknown> }>): Promise<number> {
  const started = performance.now();
  const proc = await start();
  const ms = performance.now() - started;
  await proc.stop();
  return ms;
}

const idp = await startFastIdp({ accessTtlSeconds: 3_600 });
const nodes = await startRedisNodes(2);
const embedded = await startBrokerProcess(brokerEnv(idp, undefined, { TB_LOG_LEVEL: 'warn' }), {
  compiled: true,
});
const brokerRedisEnv = brokerEnv(idp, redisTopology(nodes.urls), { TB_LOG_LEVEL: 'warn' });
const sidecarEnv = {
  TB_SIDECAR_BROKER_ADDRESS: embedded.address,
  TB_SIDECAR_USERS: 'diku/bench',
  TB_SIDECAR_LOG_LEVEL: 'info',
};
const subjects: { name: string; run: () => Promise<number> }[] = [
  { name: 'bare node:http (node -e)', run: bare },
  {
    name: 'broker, compiled',
    run: () => timed(() => startBrokerProcess(brokerRedisEnv, { compiled: true })),
  },
  { name: 'broker, tsx', run: () => timed(() => startBrokerProcess(brokerRedisEnv)) },
  {
    name: 'sidecar, compiled',
    run: () => timed(() => startSidecarProcess(sidecarEnv, { compiled: true })),
  },
  { name: 'sidecar, tsx', run: () => timed(() => startSidecarProcess(sidecarEnv)) },
];
const times = new Map<string, number[]>(subjects.map((s) => [s.name, []]));
try {
  for (const s of subjects) await s.run(); // warm-up: the file system cache
  for (let run = 0; run < RUNS; run++)
    for (const s of subjects) times.get(s.name)!.push(await s.run());
} finally {
  await embedded.stop();
  await nodes.stopAll();
  await idp.stop();
}

const median = (name: string) =>
  percentileOf(
    [...times.get(name)!].sort((a, b) => a - b),
    50,
  );
const bareMs = median('bare node:http (node -e)');
const rows: Row[] = subjects.map((s) => {
  const sorted = [...times.get(s.name)!].sort((a, b) => a - b);
  const ms = median(s.name);
  return {
    what: `${s.name} (min ${fmt.ms(sorted[0]!)}, max ${fmt.ms(sorted.at(-1)!)})`,
    value: fmt.ms(ms),
    baseline: s.name.startsWith('bare') ? '' : fmt.ms(bareMs),
    ratio: s.name.startsWith('bare') ? '' : ms / bareMs,
  };
});
rows.push(
  {
    what: 'broker: tsx / compiled',
    value: (median('broker, tsx') / median('broker, compiled')).toFixed(2),
  },
  {
    what: 'broker compiled, own start-up beyond bare node',
    value: fmt.ms(median('broker, compiled') - bareMs),
  },
);
printTable(
  `Start to listening, median of ${RUNS} runs (spawn to the 'serving' log line; target <= 250 ms ` +
    `for the compiled broker)`,
  rows,
);
