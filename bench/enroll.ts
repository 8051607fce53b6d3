/**
 * Enroll calls/s and broker CPU per Enroll in Redis mode against the fast IdP (target: >= 2,000/s),
 * beside the bare enrollment floor measured in the same run at the same concurrency: plain ioredis
 * and fetch in their own process doing what any enrollment must (a lock on every Redlock node, one
 * refresh POST to the IdP, a read and one MULTI of the writes on the state node, the unlocks;
 * bench/lib/enroll-floor.ts). Prints figures; never passes or fails on them. Everything runs on
 * 127.0.0.1 and stops by itself.
 *
 *   make bench BENCH=enroll   (BENCH_SECONDS, default 4, per round; BENCH_ROUNDS, default 2;
 *                              BENCH_CONCURRENCY, default 64 Enrolls in flight;
 *                              BENCH_CHANNELS, default 4 connections)
 *
 * Set-up: 3 Redis nodes (state on one, Redlock on the others), the fast IdP (fresh single-use
 * refresh tokens from mint(); a reuse would be counted and is printed), one compiled broker
 * process (`make build`) with TLS and caller authentication on, as in a cluster, and the load
 * client in its own process (bench/lib/grpc-load.ts). Each Enroll is a new user with its own
 * refresh token, so no two contend for a lock. Rounds alternate broker and floor.
 */
import { cpuSeconds } from './lib/proc.js';
import { printTable, fmt } from './lib/report.js';
import { startEnrollFloor } from './lib/enroll-floor.js';
import { startGrpcLoad } from './lib/grpc-load.js';
import { brokerEnv, redisTopology } from '../scripts/dev/broker-env.js';
import { startBrokerProcess } from '../scripts/dev/broker-process.js';
import { devIdentity } from '../scripts/dev/dev-identity.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';
import { startRedisNodes } from '../scripts/dev/redis-nodes.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? 64);
const CHANNELS = Number(process.env.BENCH_CHANNELS ?? 4);
/** Refresh tokens minted per round and side: more than either can use in SECONDS. */
const PER_ROUND = Math.ceil(4_000 * SECONDS);
const WARM_UP = 500;

const identity = devIdentity();
const redis = await startRedisNodes(3);
const idp = await startFastIdp({ accessTtlSeconds: 3_600 });
const load = await startGrpcLoad();
const floor = await startEnrollFloor();
const topology = redisTopology(redis.urls);
const broker = await startBrokerProcess(
  brokerEnv(idp, topology, { TB_CLAIM_POLL_MS: '250', TB_LOG_LEVEL: 'warn' }),
  {
    compiled: true,
  },
);
try {
  const target = {
    address: broker.address,
    caFile: identity.caFile,
    serverName: identity.serverName,
    tokenFile: identity.tokenFile('test-client'),
    channels: CHANNELS,
    concurrency: CONCURRENCY,
  };
  const floorSpec = async (ms: number, count: number) => ({
    tokenEndpoint: idp.tokenEndpoint,
    clientId: idp.clients.basic.clientId,
    clientSecret: idp.clients.basic.clientSecret,
    stateUrl: topology.state,
    lockUrls: [...topology.locks],
    concurrency: CONCURRENCY,
    ms,
    refreshTokens: await idp.mint(count),
    prefix: `floor${count}:`,
  });
  // Warm-up: JIT, connections, the broker's once-per-IdP introspection probe.
  await load.run({
    ...target,
    kind: 'enroll',
    ms: 10_000,
    tenant: 'diku',
    userPrefix: 'warm-',
    refreshTokens: await idp.mint(WARM_UP),
  });
  await floor.run(await floorSpec(10_000, WARM_UP));

  const b = { calls: 0, failed: 0, firstError: '', seconds: 0, cpu: 0 };
  const p50: number[] = [];
  const p99: number[] = [];
  const f = { calls: 0, failed: 0, firstError: '', seconds: 0, cpu: 0 };
  for (let round = 0; round < ROUNDS; round++) {
    const refreshTokens = await idp.mint(PER_ROUND);
    let cpu = cpuSeconds(broker.pid);
    const r = await load.run({
      ...target,
      kind: 'enroll',
      ms: SECONDS * 1_000,
      tenant: 'diku',
      userPrefix: `r${round}-`,
      refreshTokens,
    });
    b.cpu += cpuSeconds(broker.pid) - cpu;
    b.calls += r.calls;
    b.failed += r.failed;
    b.firstError ||= r.firstError;
    b.seconds += r.seconds;
    p50.push(r.p50Ms);
    p99.push(r.p99Ms);
    const spec = await floorSpec(SECONDS * 1_000, PER_ROUND);
    cpu = cpuSeconds(floor.pid);
    const fr = await floor.run(spec);
    f.cpu += cpuSeconds(floor.pid) - cpu;
    f.calls += fr.calls;
    f.failed += fr.failed;
    f.firstError ||= fr.firstError;
    f.seconds += fr.seconds;
  }
  const stats = await idp.stats();
  const bRate = b.calls / b.seconds;
  const fRate = f.calls / f.seconds;
  const bCpu = (b.cpu / Math.max(1, b.calls)) * 1e3;
  const fCpu = (f.cpu / Math.max(1, f.calls)) * 1e3;
  printTable(
    `Enroll in Redis mode, TLS + caller auth on, ${CONCURRENCY} in flight, ${ROUNDS} x ${SECONDS} s (target: >= 2,000/s)`,
    [
      { what: 'Enroll/s', value: fmt.rate(bRate), baseline: fmt.rate(fRate), ratio: bRate / fRate },
      {
        what: 'CPU per Enroll (broker / floor process)',
        value: fmt.ms(bCpu),
        baseline: fmt.ms(fCpu),
        ratio: bCpu / fCpu,
      },
      {
        what: 'Enroll latency p50 / p99 (median of rounds)',
        value: `${fmt.ms(median(p50))} / ${fmt.ms(median(p99))}`,
      },
      { what: 'refresh-token reuses at the IdP', value: String(stats.reuses) },
    ],
  );
  if (b.failed) console.log(`  broker: ${b.failed} failed Enrolls (first: ${b.firstError})`);
  if (f.failed) console.log(`  floor: ${f.failed} failed (first: ${f.firstError})`);
} finally {
  await load.stop();
  await floor.stop();
  await broker.stop();
  await idp.stop();
  await redis.stopAll();
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, c) => a - c);
  return sorted[Math.floor(sorted.length / 2)] ?? NaN;
}
