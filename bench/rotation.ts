/**
 * Rotation throughput: how many due rotations one and two broker replicas do per second, at what
 * CPU, Redis and memory cost and how late, beside a bare loop doing the same essential work in
 * the same run (bench/lib/bare-rotation-loop.ts defines it). Prints figures; never passes or
 * fails on them. Everything runs on 127.0.0.1 and stops by itself (about 2 minutes).
 *
 *   make bench BENCH=rotation   (BENCH_SESSIONS, default 3000; BENCH_SECONDS, default 8, per
 *                                measured window; BENCH_CONCURRENCY, default 32 = the broker's
 *                                TB_ROTATION_CONCURRENCY default, also the bare loop's;
 *                                BENCH_NODE_FLAGS, extra node flags for the brokers, e.g.
 *                                '--max-semi-space-size=16'; BENCH_CPU_PROF=1 profiles them;
 *                                BENCH_TELEMETRY_ENV, JSON of variables added to the telemetry
 *                                window's, e.g. '{"OTEL_TRACES_SAMPLER":"parentbased_traceidratio",
 *                                "OTEL_TRACES_SAMPLER_ARG":"0.1"}')
 *
 * Set-up: 4 real redis-server processes: node 0 holds the state (as the chart's separate state
 * master; no replica here, so no WAIT per commit), nodes 1-3 are the Redlock quorum (the chart's
 * 3 bundled lock masters). The fast IdP (scripts/dev/fast-idp.ts, its own process) issues access
 * tokens living 2 s, so each session is due 1.5 s after its last rotation (ratio 0.75, no
 * jitter). Broker replicas run the compiled entry point with --max-old-space-size=256 (what the
 * chart gives a 512Mi container) and --trace-gc, TLS and caller authentication on as in a
 * cluster; the sessions are enrolled over gRPC and never go idle (TB_SESSION_IDLE_TIMEOUT_MS
 * 24 h). The bare loop talks plain TCP to Redis and HTTP to the IdP as the broker does (the
 * broker's gRPC TLS is not on the rotation path), so the ratio measures the broker's own work.
 *
 * Figures and how each is measured:
 * - rotations/s: the fast IdP's refresh count over the window (each is one rotation);
 * - broker CPU per rotation: /proc CPU time of the replicas over the window / rotations;
 * - due lag: a Watch stream on replica 1 subscribed to BENCH_WATCHED (100) sessions; for each
 *   new generation, its arrival minus when the previous generation was due (the rotation
 *   policy's due time computed from that generation's issued_at and expires_at): due to
 *   rotated-and-delivered, so it includes the (few ms) delivery;
 * - reuses: the fast IdP's count of refresh tokens presented twice (must be 0);
 * - Redis commands per rotation: INFO commandstats delta on each node / rotations;
 * - memory: peak RSS (VmHWM) of each replica; heap and the longest GC pause from --trace-gc
 *   lines printed during the window (the atomic pause of each GC, as V8 reports it);
 * - telemetry on: OTLP/HTTP (protobuf) metrics and traces, every rotation sampled (the chart's
 *   default sampler ratio 1.0), exported every second to a local sink that answers 200
 *   (bench/lib/probes.ts), against the same replica with telemetry off;
 * - at 80% of capacity: sessions are revoked until the demand (sessions / 1.5 s) is 80% of the
 *   1-replica rate measured above, then the due lag is measured again.
 */
import { performance } from 'node:perf_hooks';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { cpuSeconds, peakRssBytes, MiB } from './lib/proc.js';
import { fmt, percentileOf, printTable, type Row } from './lib/report.js';
import { callsPer, commandCalls, formatTop, gcFigures, startOtlpSink } from './lib/probes.js';
import type { BareLoopOptions, BareLoopResult } from './lib/bare-rotation-loop.js';
import { BrokerClient, type Watcher } from '../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../scripts/dev/broker-env.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';
import { spawnNodeProcess, waitForLog, type NodeProcess } from '../scripts/dev/node-process.js';
import { startRedisNodes } from '../scripts/dev/redis-nodes.js';
import type { WatchResponse } from '../gen/tokenbroker/v1/token_broker.js';

const SESSIONS = Number(process.env.BENCH_SESSIONS ?? 3_000);
const SECONDS = Number(process.env.BENCH_SECONDS ?? 8);
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? 32);
const WATCHED = Number(process.env.BENCH_WATCHED ?? 100);
const WARM_UP_MS = 4_000;
const ACCESS_TTL_S = 2;
const DUE_EVERY_S = 0.75 * ACCESS_TTL_S;
const TENANT = 'bench';
const RSS_LIMIT = 0.6 * 512 * MiB;
const ROOT = fileURLToPath(new URL('..', import.meta.url));

interface Replica {
  proc: NodeProcess;
  pid: number;
  address: string;
}

const redis = await startRedisNodes(4);
const idp = await startFastIdp({ accessTtlSeconds: ACCESS_TTL_S });
const sink = await startOtlpSink();
const topology = redisTopology(redis.urls);
const baseEnv = brokerEnv(idp, topology, {
  TB_SESSION_IDLE_TIMEOUT_MS: String(24 * 3_600_000),
  TB_REFRESH_JITTER_RATIO: '0',
  TB_ROTATION_CONCURRENCY: String(CONCURRENCY),
  // Info level: the harness learns the port from the 'broker serving' line (as startBrokerProcess).
  TB_LOG_LEVEL: 'info',
});
const telemetryEnv = {
  OTEL_SERVICE_NAME: 'token-broker',
  OTEL_TRACES_EXPORTER: 'otlp',
  OTEL_METRICS_EXPORTER: 'otlp',
  // The chart's default is grpc; http/protobuf is the same encoding to this HTTP sink.
  OTEL_EXPORTER_OTLP_PROTOCOL: 'http/protobuf',
  OTEL_EXPORTER_OTLP_ENDPOINT: sink.url,
  OTEL_METRIC_EXPORT_INTERVAL: '1000',
  // Operators' own settings for the telemetry window, e.g. '{"OTEL_TRACES_SAMPLER_ARG":"0.1"}'.
  ...(JSON.parse(process.env.BENCH_TELEMETRY_ENV ?? '{}') as Record<string, string>),
};

async function startReplica(index: number, extra: Record<string, string> = {}): Promise<Replica> {
  const proc = spawnNodeProcess(
    'broker/main.ts',
    { ...baseEnv, TB_REPLICA_ID: `bench-${index}`, ...extra },
    {
      compiled: true,
      nodeFlags: [
        '--max-old-space-size=256',
        '--trace-gc',
        ...(process.env.BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean),
        ...(process.env.BENCH_CPU_PROF ? ['--cpu-prof', '--cpu-prof-dir=/tmp/tb-prof'] : []),
      ],
    },
  );
  const serving = await waitForLog(proc, 'broker', (e) => e.msg === 'broker serving');
  return { proc, pid: proc.child.pid!, address: `127.0.0.1:${serving.port as number}` };
}

async function inParallel<T>(items: readonly T[], width: number, fn: (item: T) => Promise<void>) {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

/** Due time of a generation, as the rotation policy computes it (jitter 0, min lead 500 ms). */
function dueOf(issuedAt: number, expiresAt: number): number {
  const ttl = expiresAt - issuedAt;
  return Math.max(issuedAt + 0.5 * 0.75 * ttl, Math.min(issuedAt + 0.75 * ttl, expiresAt - 500));
}

/** Watches `users` and records due-to-delivered lag for each new generation while `recording`. */
function lagProbe(client: BrokerClient, users: readonly string[]) {
  const watcher: Watcher = client.watch();
  const lags: number[] = [];
  let recording = false;
  const last = new Map<string, { generation: number; due: number }>();
  watcher.stream.on('data', (response: WatchResponse) => {
    if (response.event?.$case !== 'token') return;
    const e = response.event.value;
    const now = Date.now();
    const generation = Number(e.generation);
    const prev = last.get(e.user);
    if (recording && prev && generation === prev.generation + 1) lags.push(now - prev.due);
    last.set(e.user, {
      generation,
      due: dueOf(e.issuedAt?.getTime() ?? 0, e.expiresAt?.getTime() ?? 0),
    });
  });
  for (const user of users) watcher.subscribe(TENANT, user);
  return {
    start: () => {
      lags.length = 0;
      recording = true;
    },
    stop: () => {
      recording = false;
      return Float64Array.from(lags).sort();
    },
    close: () => watcher.close(),
  };
}

interface Window {
  label: string;
  rate: number;
  rotations: number;
  cpuPerRotationMs: number;
  lagP50: number;
  lagP99: number;
  lagSamples: number;
  reuses: number;
  stateCalls: ReturnType<typeof callsPer>;
  lockCalls: ReturnType<typeof callsPer>[];
  peakRss: number;
  gc: ReturnType<typeof gcFigures>;
}

/** Starts `replicas` brokers, warms up, measures one window, stops them. */
async function measure(
  label: string,
  replicas: number,
  users: readonly string[],
  extra: Record<string, string> = {},
): Promise<Window> {
  const started = await Promise.all(
    Array.from({ length: replicas }, (_, i) => startReplica(i, extra)),
  );
  const client = new BrokerClient(started[0]!.address);
  const probe = lagProbe(client, users.slice(0, WATCHED));
  try {
    await sleep(WARM_UP_MS);
    const idpBefore = await idp.stats();
    const cpuBefore = started.map((r) => cpuSeconds(r.pid));
    const redisBefore = await Promise.all(redis.urls.map(commandCalls));
    const gcFrom = started.map((r) => r.proc.output().length);
    probe.start();
    const t0 = performance.now();
    await sleep(SECONDS * 1_000);
    const seconds = (performance.now() - t0) / 1_000;
    const lags = probe.stop();
    const idpAfter = await idp.stats();
    const cpu = started.reduce((sum, r, i) => sum + cpuSeconds(r.pid) - cpuBefore[i]!, 0);
    const redisAfter = await Promise.all(redis.urls.map(commandCalls));
    const rotations = idpAfter.refreshes - idpBefore.refreshes;
    const gcs = started.map((r, i) => gcFigures(r.proc.output().slice(gcFrom[i])));
    return {
      label,
      rate: rotations / seconds,
      rotations,
      cpuPerRotationMs: (cpu / Math.max(1, rotations)) * 1_000,
      lagP50: percentileOf(lags, 50),
      lagP99: percentileOf(lags, 99),
      lagSamples: lags.length,
      reuses: idpAfter.reuses,
      stateCalls: callsPer(redisBefore[0]!, redisAfter[0]!, rotations),
      lockCalls: [1, 2, 3].map((n) => callsPer(redisBefore[n]!, redisAfter[n]!, rotations)),
      peakRss: Math.max(...started.map((r) => peakRssBytes(r.pid))),
      gc: {
        events: gcs.reduce((s, g) => s + g.events, 0),
        maxPauseMs: Math.max(...gcs.map((g) => g.maxPauseMs)),
        maxPauseKind: gcs.reduce((a, b) => (b.maxPauseMs > a.maxPauseMs ? b : a)).maxPauseKind,
        totalPauseMs: gcs.reduce((s, g) => s + g.totalPauseMs, 0),
        maxHeapUsedMb: Math.max(...gcs.map((g) => g.maxHeapUsedMb)),
        maxHeapCommittedMb: Math.max(...gcs.map((g) => g.maxHeapCommittedMb)),
      },
    };
  } finally {
    probe.close();
    client.close();
    await Promise.all(started.map((r) => r.proc.stop()));
  }
}

/** One run of the bare loop in its own process. */
async function bare(mode: BareLoopOptions['mode'], seconds: number): Promise<BareLoopResult> {
  const options: BareLoopOptions = {
    mode,
    stateUrl: redis.urls[0]!,
    lockUrls: redis.urls.slice(1),
    tokenEndpoint: idp.tokenEndpoint,
    clientId: idp.clients.basic.clientId,
    clientSecret: idp.clients.basic.clientSecret,
    sessions: SESSIONS,
    concurrency: CONCURRENCY,
    seconds,
    prefix: `bare-${mode}:`,
  };
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'bench/lib/bare-rotation-loop.ts', JSON.stringify(options)],
    { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const lines = createInterface({ input: child.stdout });
  const it = lines[Symbol.asyncIterator]();
  const first = await it.next();
  if (first.value !== 'ready') throw new Error(`bare loop: ${String(first.value)}`);
  // A short warm-up run is not possible in the same process without changing the definition:
  // the JIT warms within the first few hundred rotations, a small part of the window.
  child.stdin.write('go\n');
  const result = await it.next();
  child.stdin.end();
  return JSON.parse(String(result.value)) as BareLoopResult;
}

const users = Array.from({ length: SESSIONS }, (_, i) => `user-${i}`);
const windows: Window[] = [];
let bareFetch: BareLoopResult;
let bareHttp: BareLoopResult;
let bareRedis: BareLoopResult;
let revoked = 0;
let session80 = SESSIONS;
try {
  // Enrollment, through one replica.
  {
    const enroller = await startReplica(0);
    const client = new BrokerClient(enroller.address);
    const tokens = await idp.mint(SESSIONS);
    const t0 = performance.now();
    await inParallel(
      users.map((u, i) => [u, tokens[i]!] as const),
      32,
      async ([user, rt]) => {
        await client.enroll(TENANT, user, rt);
      },
    );
    console.log(
      `enrolled ${SESSIONS} sessions in ${((performance.now() - t0) / 1_000).toFixed(1)} s`,
    );
    client.close();
    await enroller.proc.stop();
  }
  const bareSeconds = Math.max(3, SECONDS / 2);
  bareFetch = await bare('fetch', bareSeconds);
  bareHttp = await bare('http', bareSeconds);
  bareRedis = await bare('redis-only', bareSeconds);

  windows.push(await measure('1 replica', 1, users));
  windows.push(await measure('2 replicas', 2, users));
  windows.push(await measure('1 replica, telemetry on', 1, users, telemetryEnv));

  // 80% of the 1-replica capacity: fewer sessions.
  const capacity = windows[0]!.rate;
  session80 = Math.min(SESSIONS, Math.round(0.8 * capacity * DUE_EVERY_S));
  if (session80 < SESSIONS) {
    const revoker = await startReplica(0);
    const client = new BrokerClient(revoker.address);
    await inParallel(users.slice(session80), 32, async (user) => {
      await client.revoke(TENANT, user);
      revoked++;
    });
    client.close();
    await revoker.proc.stop();
  }
  windows.push(await measure(`1 replica at 80%`, 1, users.slice(0, session80)));
} finally {
  await sink.close();
  await idp.stop();
  await redis.stopAll();
}

const perRot = (r: BareLoopResult) => (r.cpuSeconds / Math.max(1, r.rotations)) * 1_000;
const bareRate = (r: BareLoopResult) => r.rotations / r.seconds;
const [one, two, tel, at80] = windows as [Window, Window, Window, Window];
const rows: Row[] = [];
for (const w of [one, two, tel]) {
  rows.push({
    what: `rotations/s, ${w.label}, ${SESSIONS} sessions due every ${DUE_EVERY_S} s`,
    value: fmt.rate(w.rate),
    baseline: `bare loop (fetch) ${fmt.rate(bareRate(bareFetch))}`,
    ratio: w.rate / bareRate(bareFetch),
  });
  rows.push({
    what: `  broker CPU per rotation (${w.label})`,
    value: fmt.ms(w.cpuPerRotationMs),
    baseline: `bare loop ${fmt.ms(perRot(bareFetch))}`,
    ratio: w.cpuPerRotationMs / perRot(bareFetch),
  });
  rows.push({
    what: `  due lag p50 / p99 (${w.label}; ${w.lagSamples} samples)`,
    value: `${fmt.ms(w.lagP50)} / ${fmt.ms(w.lagP99)}`,
  });
}
rows.push({
  what: 'rotations/s, 2 replicas / 1 replica',
  value: `${fmt.rate(two.rate)} / ${fmt.rate(one.rate)}`,
  baseline: 'target >= 1.6 until saturated',
  ratio: two.rate / one.rate,
});
rows.push({
  what: 'rotations/s, telemetry on / off (OTLP metrics + traces)',
  value: `${fmt.rate(tel.rate)} / ${fmt.rate(one.rate)}`,
  baseline: 'target >= 0.95',
  ratio: tel.rate / one.rate,
});
rows.push({
  what: `due lag p50 / p99 at 80% of capacity (${session80} sessions, ${at80.lagSamples} samples)`,
  value: `${fmt.ms(at80.lagP50)} / ${fmt.ms(at80.lagP99)}`,
  baseline: 'target p99 < 100 ms',
});
rows.push({
  what: '  rotations/s at 80% (demand / done)',
  value: `${fmt.rate(session80 / DUE_EVERY_S)} / ${fmt.rate(at80.rate)}`,
});
rows.push({
  what: 'bare loop variants: node:http keep-alive / Redis commands alone',
  value: `${fmt.rate(bareRate(bareHttp))}, ${fmt.ms(perRot(bareHttp))} CPU / ${fmt.rate(bareRate(bareRedis))}, ${fmt.ms(perRot(bareRedis))} CPU`,
  baseline: `fetch ${fmt.rate(bareRate(bareFetch))}, ${fmt.ms(perRot(bareFetch))} CPU`,
});
rows.push({
  what: 'reuses at the IdP (must be 0)',
  value: String(at80.reuses),
  baseline: `bare loops' failures ${bareFetch.failures + bareHttp.failures + bareRedis.failures}`,
});
for (const w of [one, two]) {
  rows.push({
    what: `Redis commands per rotation, state node (${w.label})`,
    value: w.stateCalls.total.toFixed(1),
    baseline: 'bare loop 4 (hget, hset, zadd, publish)',
    ratio: w.stateCalls.total / 4,
  });
  rows.push({ what: `  top`, value: formatTop(w.stateCalls.top) });
  rows.push({
    what: `Redis commands per rotation, each lock node (${w.label})`,
    value: w.lockCalls.map((c) => c.total.toFixed(1)).join(' / '),
    baseline: 'bare loop 2 (set, eval)',
    ratio: w.lockCalls[0]!.total / 2,
  });
  rows.push({ what: `  top (lock node 1)`, value: formatTop(w.lockCalls[0]!.top) });
}
for (const w of [one, two, tel]) {
  rows.push({
    what: `broker peak RSS (${w.label}; --max-old-space-size=256)`,
    value: fmt.mib(w.peakRss),
    baseline: `60% of 512Mi ${fmt.mib(RSS_LIMIT)}`,
    ratio: w.peakRss / RSS_LIMIT,
  });
  rows.push({
    what: `  heap used / committed, max (${w.label})`,
    value: `${w.gc.maxHeapUsedMb.toFixed(0)} / ${w.gc.maxHeapCommittedMb.toFixed(0)} MB`,
  });
  rows.push({
    what: `  GC: longest pause, total pause / s, events (${w.label})`,
    value: `${fmt.ms(w.gc.maxPauseMs)} (${w.gc.maxPauseKind}), ${fmt.ms(w.gc.totalPauseMs / SECONDS)}/s, ${w.gc.events}`,
    baseline: 'target longest < 50 ms',
  });
}
printTable(
  `Rotation throughput: ${SESSIONS} sessions, ${CONCURRENCY} rotations in flight, ${SECONDS} s windows (revoked for 80%: ${revoked})`,
  rows,
);
