/**
 * GetToken calls/s and broker CPU per call, in Redis mode and embedded mode, beside a bare
 * grpc-js unary server measured in the same run with the same load client (target: Redis mode
 * >= 0.9 of bare). Prints figures; never passes or fails on them. Everything runs on 127.0.0.1
 * and stops by itself.
 *
 *   make bench BENCH=get-token   (BENCH_SECONDS, default 4, per round; BENCH_ROUNDS, default 2;
 *                                 BENCH_CONCURRENCY, default 64 calls in flight;
 *                                 BENCH_CHANNELS, default 4 connections, and BENCH_CLIENTS,
 *                                 default 2 load processes, each with that many)
 *
 * Set-up: 3 Redis nodes (state on one, Redlock on the others), the fast IdP (access tokens live an
 * hour, so nothing rotates during the run), compiled broker processes (`make build`): Redis mode
 * with caller authentication on (TLS + ServiceAccount token + policy, as in a cluster), the same
 * with TB_AUTH=off (to separate the auth cost), and embedded mode with auth on; one enrolled user
 * each. The baseline is a bare grpc-js server in its own process on the same TLS certificate and
 * service definition, answering a canned GetToken response of the broker's size: the same
 * transport, so the ratio measures the broker's own work (auth, policy, state, mapping) per call.
 * The load clients run in their own processes (bench/lib/grpc-load.ts), sending the bearer token
 * to every target (the bare server ignores it); their CPU per call is printed too: a client near
 * one core per process limits calls/s of every target alike, and CPU per call is the figure then. Rounds alternate targets, so drift hits all alike.
 * The machine is small and may be shared: CPU per call is steadier than calls/s.
 */
import { cpuSeconds } from './lib/proc.js';
import { printTable, fmt, type Row } from './lib/report.js';
import { startBareGrpc, type BareGrpc } from './lib/bare-grpc.js';
import { startGrpcLoad, type GrpcLoad, type LoadResult } from './lib/grpc-load.js';
import { BrokerClient } from '../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../scripts/dev/broker-process.js';
import { devIdentity } from '../scripts/dev/dev-identity.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';
import { startRedisNodes } from '../scripts/dev/redis-nodes.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? 64);
const CHANNELS = Number(process.env.BENCH_CHANNELS ?? 4);
/** Load client processes, each with CONCURRENCY calls in flight on CHANNELS connections. */
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 2);

const identity = devIdentity();
const AUTH_OFF = { TB_AUTH: 'off', TB_AUTH_ISSUER: '', TB_AUTH_JWKS_FILE: '', TB_POLICY_FILE: '' };

interface Target {
  name: string;
  pid: number;
  address: string;
  stop(): Promise<unknown>;
  calls: number;
  failed: number;
  firstError: string;
  seconds: number;
  cpu: number;
  clientCpu: number;
  p50: number[];
  p99: number[];
}

const redis = await startRedisNodes(3);
const idp = await startFastIdp({ accessTtlSeconds: 3_600 });
const loads: GrpcLoad[] = [];
for (let i = 0; i < CLIENTS; i++) loads.push(await startGrpcLoad());
/** Every load client at once on one target; calls summed, the longest run's seconds. */
const runAll = async (spec: Parameters<GrpcLoad['run']>[0]): Promise<LoadResult> => {
  const results = await Promise.all(loads.map((l) => l.run(spec)));
  return {
    calls: results.reduce((a, r) => a + r.calls, 0),
    failed: results.reduce((a, r) => a + r.failed, 0),
    firstError: results.find((r) => r.firstError)?.firstError ?? '',
    seconds: Math.max(...results.map((r) => r.seconds)),
    p50Ms: median(results.map((r) => r.p50Ms)),
    p99Ms: Math.max(...results.map((r) => r.p99Ms)),
  };
};
const targets: Target[] = [];
const started: { stop(): Promise<unknown> }[] = [];
try {
  const brokers: [string, Record<string, string>, boolean][] = [
    ['broker, Redis mode, auth on', {}, true],
    ['broker, Redis mode, auth off', AUTH_OFF, true],
    ['broker, embedded, auth on', {}, false],
  ];
  let sample: Awaited<ReturnType<BrokerClient['getToken']>> | undefined;
  for (const [name, extra, withRedis] of brokers) {
    const env = brokerEnv(idp, withRedis ? redisTopology(redis.urls) : undefined, {
      ...extra,
      // Tokens live an hour: the production claim poll, not the tests' fast one.
      TB_CLAIM_POLL_MS: '250',
      TB_LOG_LEVEL: 'warn',
    });
    const broker: BrokerProcess = await startBrokerProcess(env, { compiled: true });
    started.push(broker);
    const client = new BrokerClient(broker.address);
    await client.enroll('diku', 'bench', (await idp.mint(1))[0]!);
    sample ??= await client.getToken('diku', 'bench');
    client.close();
    targets.push({ name, pid: broker.pid, address: broker.address, stop: broker.stop, ...zero() });
  }
  // The bare server answers a response of the broker's size (a stand-in token of the same length).
  const token = sample!.token!;
  const bare: BareGrpc = await startBareGrpc({
    certFile: identity.certFile,
    keyFile: identity.keyFile,
    response: { token: { ...token, accessToken: 'x'.repeat(token.accessToken.length) } },
  });
  started.push(bare);
  targets.unshift({ name: 'bare grpc-js unary', ...bare, ...zero() });

  const spec = (t: Target, ms: number) => ({
    kind: 'getToken' as const,
    address: t.address,
    caFile: identity.caFile,
    serverName: identity.serverName,
    tokenFile: identity.tokenFile('test-client'),
    channels: CHANNELS,
    concurrency: CONCURRENCY,
    ms,
    tenant: 'diku',
    user: 'bench',
  });
  for (const t of targets) await runAll(spec(t, 1_000)); // warm-up: JIT, connections, caches
  for (let round = 0; round < ROUNDS; round++)
    for (const t of targets) {
      const cpu = cpuSeconds(t.pid);
      const clientCpu = loads.reduce((a, l) => a + cpuSeconds(l.pid), 0);
      const r: LoadResult = await runAll(spec(t, SECONDS * 1_000));
      t.cpu += cpuSeconds(t.pid) - cpu;
      t.clientCpu += loads.reduce((a, l) => a + cpuSeconds(l.pid), 0) - clientCpu;
      t.calls += r.calls;
      t.failed += r.failed;
      t.firstError ||= r.firstError;
      t.seconds += r.seconds;
      t.p50.push(r.p50Ms);
      t.p99.push(r.p99Ms);
    }

  const bareT = targets[0]!;
  const rate = (t: Target) => t.calls / t.seconds;
  const cpuPerCall = (t: Target) => (t.cpu / Math.max(1, t.calls)) * 1e6;
  const rows: Row[] = [];
  for (const t of targets.slice(1)) {
    rows.push({
      what: `${t.name}: calls/s`,
      value: fmt.rate(rate(t)),
      baseline: fmt.rate(rate(bareT)),
      ratio: rate(t) / rate(bareT),
    });
    rows.push({
      what: `${t.name}: server CPU per call`,
      value: fmt.us(cpuPerCall(t)),
      baseline: fmt.us(cpuPerCall(bareT)),
      ratio: cpuPerCall(t) / cpuPerCall(bareT),
    });
    rows.push({
      what: `${t.name}: load clients' CPU per call`,
      value: fmt.us((t.clientCpu / Math.max(1, t.calls)) * 1e6),
      baseline: fmt.us((bareT.clientCpu / Math.max(1, bareT.calls)) * 1e6),
    });
    rows.push({
      what: `${t.name}: latency p50 / p99 (median of rounds)`,
      value: `${fmt.ms(median(t.p50))} / ${fmt.ms(median(t.p99))}`,
      baseline: `${fmt.ms(median(bareT.p50))} / ${fmt.ms(median(bareT.p99))}`,
    });
  }
  printTable(
    `GetToken over TLS, ${CLIENTS} load processes x ${CONCURRENCY} in flight on ${CHANNELS} connections, ${ROUNDS} x ${SECONDS} s per target (target: Redis mode auth on >= 0.90 of bare)`,
    rows,
  );
  for (const t of targets)
    if (t.failed) console.log(`  ${t.name}: ${t.failed} failed calls (first: ${t.firstError})`);
} finally {
  for (const l of loads) await l.stop();
  for (const s of started.reverse()) await s.stop();
  await idp.stop();
  await redis.stopAll();
}

function zero() {
  return {
    calls: 0,
    failed: 0,
    firstError: '',
    seconds: 0,
    cpu: 0,
    clientCpu: 0,
    p50: [],
    p99: [],
  };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? NaN;
}
