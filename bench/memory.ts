/**
 * Memory per session at BENCH_SESSIONS (default 100,000) sessions: the broker's RSS and V8 heap
 * in Redis mode, Redis used_memory, and the broker in embedded mode. The baseline of each figure
 * is the same process before its first session, measured in the same run: per session = (after
 * - before) / sessions. Heap figures are taken after forced full GCs, through the inspector
 * protocol (`--inspect=127.0.0.1:<port>`, bench/lib/heap-probe.ts), so they count what is kept,
 * not garbage not yet collected; RSS is read from /proc right after. Prints figures; never passes
 * or fails on them. Everything runs on 127.0.0.1 and stops by itself.
 *
 *   make bench BENCH=memory   (BENCH_SESSIONS, default 100000, in Redis mode; BENCH_EMBEDDED_SESSIONS,
 *                              default 20000; BENCH_CONCURRENCY, default 256)
 *
 * Set-up: the fast IdP (scripts/dev/fast-idp.ts, opaque tokens: a 38-byte refresh token, a 35-byte
 * access token), two Redis nodes (state, one Redlock node), compiled brokers (dist/, as the image
 * runs them) with TLS and caller authentication on.
 * - Redis mode: enrolling 100k sessions through gRPC would take minutes, so this process writes
 *   the records with the broker's own store code (RedisSessionStore.commit of the `enrolled`
 *   transition: sealed, indexed and published exactly as Enroll writes them), with the broker
 *   running and receiving every commit's event. Then the broker reads a sample back with GetToken
 *   (proving the records are its own), and is measured.
 * - Embedded mode: the only way in is Enroll, so BENCH_EMBEDDED_SESSIONS concurrent Enroll calls
 *   through gRPC against the fast IdP (each one rotation there), then measured. Fewer than in Redis
 *   mode by default (Enroll runs at a few hundred per second here, and the bench must stay well
 *   under 3 minutes); what a session keeps does not depend on how many there are.
 */
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { HeapProbe, inspectFlag, type HeapFigures } from './lib/heap-probe.js';
import { rssBytes } from './lib/proc.js';
import { fmt, printTable, type Row } from './lib/report.js';
import { loadConfig } from '../broker/config.js';
import { parseSealingKeys, Sealer } from '../broker/sealing.js';
import { enrolled } from '../broker/session-transitions.js';
import { RedisSessionStore } from '../broker/store/redis-session-store.js';
import { BrokerClient } from '../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../scripts/dev/broker-process.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';
import { startRedisNodes } from '../scripts/dev/redis-nodes.js';

const SESSIONS = Number(process.env.BENCH_SESSIONS ?? 100_000);
const EMBEDDED_SESSIONS = Number(process.env.BENCH_EMBEDDED_SESSIONS ?? 20_000);
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? 256);
const SAMPLE = Math.min(1_000, SESSIONS);
const TENANT = 'diku';
const userOf = (i: number) => `user-${i}`;

interface Measured {
  rss: number;
  heap: HeapFigures;
}

async function startMeasured(
  env: Record<string, string>,
): Promise<{ broker: BrokerProcess; probe: HeapProbe }> {
  const inspect = await inspectFlag();
  const broker = await startBrokerProcess(env, { compiled: true, nodeFlags: [inspect.flag] });
  return { broker, probe: await HeapProbe.connect(inspect.port) };
}

async function measure(broker: BrokerProcess, probe: HeapProbe): Promise<Measured> {
  // Let timers and event handlers that were due run first.
  await new Promise((resolve) => setTimeout(resolve, 500));
  const heap = await probe.gcAndMeasure();
  return { heap, rss: rssBytes(broker.pid) };
}

/** Runs `work(i)` for i in [0, count) with `CONCURRENCY` in flight; returns failures. */
async function pool(count: number, work: (i: number) => Promise<unknown>): Promise<number> {
  let next = 0;
  let failed = 0;
  await Promise.all(
    Array.from({ length: Math.min(CONCURRENCY, count) }, async () => {
      while (next < count) {
        const i = next++;
        try {
          await work(i);
        } catch {
          failed++;
        }
      }
    }),
  );
  return failed;
}

async function usedMemory(redis: Redis): Promise<number> {
  const info = await redis.info('memory');
  return Number(/used_memory:(\d+)/.exec(info)?.[1] ?? 0);
}

const perSession = (before: number, after: number, sessions = SESSIONS) =>
  fmt.kib((after - before) / sessions);
const rows: Row[] = [];
const idp = await startFastIdp({ accessTtlSeconds: 3_600 });
const nodes = await startRedisNodes(2);
const started = performance.now();
try {
  // Redis mode.
  const topology = redisTopology(nodes.urls);
  const env = brokerEnv(idp, topology, { TB_LOG_LEVEL: 'warn' });
  const state = new Redis(topology.state);
  const redisBefore = await usedMemory(state);
  const redisMode = await startMeasured(env);
  const before = await measure(redisMode.broker, redisMode.probe);

  const config = loadConfig(env);
  const store = new RedisSessionStore(
    {
      target: config.stateStore!,
      prefix: config.keyPrefix,
      minReplicas: 0,
      waitTimeoutMs: config.redisWaitTimeoutMs,
    },
    new Sealer(parseSealingKeys(config.sealingKeysText ?? '', config.sealingKeysSetting)),
    pino({ level: 'silent' }),
  );
  await store.waitReady(5_000);
  const refreshTokens = await idp.mint(SESSIONS);
  const writeStart = performance.now();
  const now = Date.now();
  const writeFailed = await pool(SESSIONS, async (i) => {
    const transition = enrolled(
      { tenant: TENANT, user: userOf(i) },
      'default',
      { refreshToken: refreshTokens[i]!, login: undefined, enrolledBy: 'bench/sidecar' },
      undefined,
      {
        now,
        traceparent: `00-${randomBytes(16).toString('hex')}-${randomBytes(8).toString('hex')}-01`,
      },
      {
        tokens: {
          accessToken: `at.${randomBytes(24).toString('base64url')}`,
          tokenType: 'Bearer',
          accessExpiresAt: now + 3_600_000,
          refreshToken: refreshTokens[i]!,
        },
        nextRefreshAt: now + 2_700_000,
      },
    );
    if (!(await store.commit(transition, null, now))) throw new Error('commit refused');
  });
  const writeSeconds = (performance.now() - writeStart) / 1_000;
  await store.close();
  refreshTokens.length = 0;

  const client = new BrokerClient(redisMode.broker.address);
  const readFailed = await pool(SAMPLE, (i) =>
    client.getToken(TENANT, userOf(Math.floor((i * SESSIONS) / SAMPLE))),
  );
  client.close();
  const after = await measure(redisMode.broker, redisMode.probe);
  const redisAfter = await usedMemory(state);
  redisMode.probe.close();
  await redisMode.broker.stop();
  state.disconnect();
  rows.push(
    {
      what: `Redis mode: broker RSS, ${SESSIONS} sessions`,
      value: fmt.mib(after.rss),
      baseline: `${fmt.mib(before.rss)} before any session`,
      ratio: after.rss / before.rss,
    },
    { what: '  broker RSS per session', value: perSession(before.rss, after.rss) },
    {
      what: '  broker V8 heap after GC',
      value: fmt.mib(after.heap.used),
      baseline: fmt.mib(before.heap.used),
      ratio: after.heap.used / before.heap.used,
    },
    { what: '  broker heap per session', value: perSession(before.heap.used, after.heap.used) },
    {
      what: '  Redis used_memory',
      value: fmt.mib(redisAfter),
      baseline: fmt.mib(redisBefore),
      ratio: redisAfter / redisBefore,
    },
    { what: '  Redis per session', value: perSession(redisBefore, redisAfter) },
    {
      what: '  records written by the store code',
      value: `${fmt.rate(SESSIONS / writeSeconds)} (${writeFailed} failed)`,
    },
    { what: `  GetToken of ${SAMPLE} sampled sessions`, value: `${readFailed} failed` },
  );

  // Embedded mode.
  const embedded = await startMeasured(brokerEnv(idp, undefined, { TB_LOG_LEVEL: 'warn' }));
  const embeddedBefore = await measure(embedded.broker, embedded.probe);
  const tokens = await idp.mint(EMBEDDED_SESSIONS);
  const embeddedClient = new BrokerClient(embedded.broker.address);
  const enrollStart = performance.now();
  const enrollFailed = await pool(EMBEDDED_SESSIONS, (i) =>
    embeddedClient.enroll(TENANT, userOf(i), tokens[i]!),
  );
  const enrollSeconds = (performance.now() - enrollStart) / 1_000;
  embeddedClient.close();
  tokens.length = 0;
  const embeddedAfter = await measure(embedded.broker, embedded.probe);
  embedded.probe.close();
  await embedded.broker.stop();
  rows.push(
    {
      what: `embedded: broker RSS, ${EMBEDDED_SESSIONS} sessions`,
      value: fmt.mib(embeddedAfter.rss),
      baseline: `${fmt.mib(embeddedBefore.rss)} before any session`,
      ratio: embeddedAfter.rss / embeddedBefore.rss,
    },
    {
      what: '  broker RSS per session',
      value: perSession(embeddedBefore.rss, embeddedAfter.rss, EMBEDDED_SESSIONS),
    },
    {
      what: '  broker V8 heap after GC',
      value: fmt.mib(embeddedAfter.heap.used),
      baseline: fmt.mib(embeddedBefore.heap.used),
      ratio: embeddedAfter.heap.used / embeddedBefore.heap.used,
    },
    {
      what: '  broker heap per session (target <= 2 KiB)',
      value: perSession(embeddedBefore.heap.used, embeddedAfter.heap.used, EMBEDDED_SESSIONS),
    },
    {
      what: '  Enroll through gRPC',
      value: `${fmt.rate(EMBEDDED_SESSIONS / enrollSeconds)} (${enrollFailed} failed)`,
    },
  );
} finally {
  await nodes.stopAll();
  await idp.stop();
}
printTable(
  `Memory per session (compiled brokers, TLS + auth on; baseline: the same process before its ` +
    `first session; ${((performance.now() - started) / 1_000).toFixed(0)} s)`,
  rows,
);
