/**
 * Rotation-to-delivery latency (blueprint promise 6: a new token reaches every watching sidecar
 * within tens of milliseconds) at 1,000, 5,000 and 20,000 watchers, beside a bare path measured in
 * the same run. Prints figures; never passes or fails on them. Everything runs on 127.0.0.1 and
 * stops by itself.
 *
 *   make bench BENCH=delivery   (BENCH_SECONDS, default 8, measured per size and server, after a
 *                                1.5 s warm-up; BENCH_RATE, default 20 rotations/s;
 *                                BENCH_WATCHERS, default 1000,5000,20000; BENCH_LOADERS, default
 *                                2 load processes; BENCH_BROKER_NODE_FLAGS, e.g. --cpu-prof)
 *
 * Set-up (real processes): 4 Redis nodes (the state node and 3 Redlock nodes, as the chart's
 * shape), the fast IdP (scripts/dev/fast-idp.ts, access tokens of an hour so nothing rotates on
 * its own), one broker from the compiled entry point with TLS and caller authentication on (the
 * dev cluster identity), 100 enrolled users, and load processes (bench/lib/watch-load.ts).
 *
 * A watcher is one (user, stream) pair: each Watch stream subscribes 10 users, as a sidecar
 * watches its users on one stream, so 1,000 watchers are 100 streams and each user has 10
 * watchers; 20,000 are 2,000 streams, 200 per user. The streams are spread over the load
 * processes, 4 HTTP/2 connections each. Rotations are forced with the Refresh RPC, round robin
 * over the users at BENCH_RATE per second, each one reaching that user's watchers.
 *
 * What is measured: per (user, stream, generation), from the moment a load process read the
 * session event's PUBLISH on its own plain SUBSCRIBE connection (the broker publishes right after
 * the state store acknowledged the commit, so that is the commit's moment) to the moment that
 * stream received the generation, both read in the same process with performance.now() (one
 * clock). It includes the broker receiving the event, re-reading and unsealing the record,
 * encoding, queueing and writing, HTTP/2 + TLS, and the client's decoding.
 *
 * The baseline (bench/lib/bare-watch-server.ts) is the same path bare: a PUBLISH on the same
 * Redis -> a plain ioredis SUBSCRIBE in a bare grpc-js server process -> a call.write of a token
 * event of the same size to every stream watching that user -> the same load processes over the
 * same TLS. Transport costs are then in both, so the ratio measures the broker's own work.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import { cpuSeconds } from './lib/proc.js';
import { fmt, percentileOf, printTable, type Row } from './lib/report.js';
import type { BareShape } from './lib/bare-watch-server.js';
import type { LoadResult, LoadSpec } from './lib/watch-load.js';
import { KeySpace } from '../broker/store/keys.js';
import { BrokerClient } from '../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../scripts/dev/broker-env.js';
import { startBrokerProcess } from '../scripts/dev/broker-process.js';
import { devIdentity } from '../scripts/dev/dev-identity.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';
import { startRedisNodes } from '../scripts/dev/redis-nodes.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 8);
const RATE = Number(process.env.BENCH_RATE ?? 20);
const SIZES = (process.env.BENCH_WATCHERS ?? '1000,5000,20000').split(',').map(Number);
const LOADERS = Number(process.env.BENCH_LOADERS ?? 2);
const BROKER_NODE_FLAGS = (process.env.BENCH_BROKER_NODE_FLAGS ?? '').split(' ').filter(Boolean);
const USERS = 100;
const USERS_PER_STREAM = 10;
const CONNECTIONS_PER_LOADER = 4;
const WARMUP_MS = 1_500;
const TENANT = 'bench';
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const children = new Set<ChildProcess>();
process.on('exit', () => children.forEach((c) => c.kill('SIGKILL')));

function child(file: string): ChildProcess {
  const proc = fork(file, [], { cwd: ROOT, execArgv: ['--import', 'tsx'], stdio: 'inherit' });
  children.add(proc);
  proc.once('exit', () => children.delete(proc));
  return proc;
}

function next<T extends { type: string }>(proc: ChildProcess, type: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const onMessage = (message: T & { message?: string }) => {
      if (message.type === 'failed') {
        cleanup();
        reject(new Error(`load process: ${message.message}`));
      } else if (message.type === type) {
        cleanup();
        resolve(message);
      }
    };
    const onExit = (code: number | null) => {
      cleanup();
      reject(new Error(`a child exited (${code}) while waiting for '${type}'`));
    };
    const cleanup = () => {
      proc.off('message', onMessage);
      proc.off('exit', onExit);
    };
    proc.on('message', onMessage);
    proc.once('exit', onExit);
  });
}

const users = Array.from({ length: USERS }, (_, i) => `u${String(i).padStart(3, '0')}`);

/** `watchers` (user, stream) pairs as streams of USERS_PER_STREAM users, every user alike. */
function streamsFor(watchers: number): string[][] {
  const count = Math.ceil(watchers / USERS_PER_STREAM);
  return Array.from({ length: count }, (_, s) =>
    Array.from(
      { length: USERS_PER_STREAM },
      (_, k) => `${TENANT}/${users[(s * USERS_PER_STREAM + k) % USERS]!}`,
    ),
  );
}

interface Measured {
  latencies: Float64Array;
  early: number;
  unmatched: number;
  errors: number;
  rotations: number;
  expected: number;
  cpuUsPerRotation: number;
  /** From the subscriptions sent to every watcher holding its first state. */
  subscribeMs: number;
}

/**
 * Opens `watchers` watchers on `address`, then forces rotations with `rotate` at RATE per second:
 * WARMUP_MS unmeasured, then SECONDS measured, then a second for the last deliveries.
 */
async function measure(
  address: string,
  pid: number,
  eventChannels: string[],
  watchers: number,
  rotate: (user: string) => Promise<void>,
  redisUrl: string,
): Promise<Measured> {
  const identity = devIdentity();
  const streams = streamsFor(watchers);
  const loaders = Array.from({ length: LOADERS }, () => child('bench/lib/watch-load.ts'));
  try {
    // The load processes start (tsx) before the clock does: it times the subscriptions only.
    await Promise.all(loaders.map((proc) => next(proc, 'spawned')));
    const subscribing = performance.now();
    await Promise.all(
      loaders.map((proc, i) => {
        const spec: LoadSpec = {
          address,
          caFile: identity.caFile,
          serverName: identity.serverName,
          tokenFile: identity.tokenFile('bench-watcher'),
          redisUrl,
          eventChannels,
          streams: streams.filter((_, s) => s % LOADERS === i),
          connections: CONNECTIONS_PER_LOADER,
        };
        const ready = next(proc, 'ready');
        proc.send({ type: 'start', ...spec });
        return ready;
      }),
    );
    const subscribeMs = performance.now() - subscribing;
    let turn = 0;
    let rotations = 0;
    let failures = 0;
    const pending = new Set<Promise<void>>();
    const drive = async (ms: number, counted: boolean) => {
      const started = performance.now();
      let sent = 0;
      while (performance.now() - started < ms) {
        const due = ((performance.now() - started) / 1000) * RATE;
        while (sent < due) {
          sent++;
          if (counted) rotations++;
          const p = rotate(users[turn++ % USERS]!).catch(() => void failures++);
          pending.add(p);
          void p.finally(() => pending.delete(p));
        }
        await sleep(2);
      }
    };
    await drive(WARMUP_MS, false);
    await Promise.all(pending);
    await sleep(200);
    for (const proc of loaders) proc.send({ type: 'measure' });
    const cpu = cpuSeconds(pid);
    await drive(SECONDS * 1_000, true);
    await Promise.all(pending);
    await sleep(1_000);
    const used = cpuSeconds(pid) - cpu;
    const results = await Promise.all(
      loaders.map((proc) => {
        const result = next<LoadResult & { type: string }>(proc, 'result');
        proc.send({ type: 'stop' });
        return result;
      }),
    );
    const latencies = new Float64Array(results.reduce((n, r) => n + r.latencies.length, 0));
    let offset = 0;
    for (const r of results) {
      latencies.set(r.latencies, offset);
      offset += r.latencies.length;
    }
    latencies.sort();
    if (failures > 0) console.log(`  (${failures} rotation triggers failed)`);
    return {
      latencies,
      early: results.reduce((n, r) => n + r.early, 0),
      unmatched: results.reduce((n, r) => n + r.unmatched, 0),
      errors: results.reduce((n, r) => n + r.errors, 0),
      rotations,
      expected: (rotations - failures) * (watchers / USERS),
      cpuUsPerRotation: (used * 1e6) / Math.max(1, rotations),
      subscribeMs,
    };
  } finally {
    for (const proc of loaders) proc.kill('SIGTERM');
  }
}

const redis = await startRedisNodes(4);
const topology = redisTopology(redis.urls);
const idp = await startFastIdp({ accessTtlSeconds: 3_600 });
const broker = await startBrokerProcess(brokerEnv(idp, topology, { TB_LOG_LEVEL: 'warn' }), {
  compiled: true,
  nodeFlags: BROKER_NODE_FLAGS,
});
const client = new BrokerClient(broker.address);
const publisher = new Redis(topology.state, { maxRetriesPerRequest: null });
let bare: ChildProcess | undefined;
try {
  const generations = new Map<string, number>();
  const tokens = await idp.mint(USERS);
  for (const [i, user] of users.entries()) {
    const enrolled = await client.enroll(TENANT, user, tokens[i]!);
    generations.set(user, enrolled.session?.generation ?? 0);
  }
  // The baseline writes events of the broker's size (lengths only; no token is printed).
  const probe = (await client.getToken(TENANT, users[0]!)).token!;
  const shape: BareShape = {
    accessToken: probe.accessToken.length,
    traceparent: probe.traceparent.length,
    epoch: probe.epoch.length,
  };
  const brokerKeys = new KeySpace(topology.prefix);
  const bareKeys = new KeySpace(`${topology.prefix}bare:`);
  const channels = (keys: KeySpace) => KeySpace.shards.map((s) => keys.events(s));

  bare = child('bench/lib/bare-watch-server.ts');
  const listening = next<{ type: string; port: number }>(bare, 'listening');
  bare.send({
    type: 'start',
    certFile: devIdentity().certFile,
    keyFile: devIdentity().keyFile,
    redisUrl: topology.state,
    eventChannels: channels(bareKeys),
    shape,
  });
  const bareAddress = `127.0.0.1:${(await listening).port}`;
  const bareGenerations = new Map<string, number>();

  const rotateBroker = async (user: string) => {
    const answer = await client.refresh(TENANT, user, generations.get(user)!);
    generations.set(user, Math.max(generations.get(user)!, answer.token?.generation ?? 0));
  };
  const rotateBare = async (user: string) => {
    const generation = (bareGenerations.get(user) ?? 0) + 1;
    bareGenerations.set(user, generation);
    const id = KeySpace.sessionId({ tenant: TENANT, user });
    await publisher.publish(
      bareKeys.events(KeySpace.shardOf(id)),
      JSON.stringify({ tenant: TENANT, user, generation, epoch: 'x'.repeat(shape.epoch) }),
    );
  };

  const rows: Row[] = [];
  const notes: string[] = [];
  const cpu: { perUser: number; ours: number; base: number }[] = [];
  for (const watchers of SIZES) {
    const streams = Math.ceil(watchers / USERS_PER_STREAM);
    const base = await measure(
      bareAddress,
      bare.pid!,
      channels(bareKeys),
      watchers,
      rotateBare,
      topology.state,
    );
    const ours = await measure(
      broker.address,
      broker.pid,
      channels(brokerKeys),
      watchers,
      rotateBroker,
      topology.state,
    );
    console.log(
      `  ${watchers} watchers: bare p99 ${fmt.ms(percentileOf(base.latencies, 99))}, ` +
        `broker p99 ${fmt.ms(percentileOf(ours.latencies, 99))}`,
    );
    const label = `${watchers.toLocaleString('en')} watchers (${USERS} users x ${watchers / USERS}, ${streams} streams)`;
    for (const p of [50, 99]) {
      const a = percentileOf(ours.latencies, p);
      const b = percentileOf(base.latencies, p);
      rows.push({ what: `p${p}, ${label}`, value: fmt.ms(a), baseline: fmt.ms(b), ratio: a / b });
    }
    const max = (m: Measured) => m.latencies[m.latencies.length - 1] ?? Number.NaN;
    rows.push({
      what: `max, ${label}`,
      value: fmt.ms(max(ours)),
      baseline: fmt.ms(max(base)),
      ratio: max(ours) / max(base),
    });
    rows.push({
      what: `server CPU per rotation (broker: with the rotation), ${label}`,
      value: fmt.us(ours.cpuUsPerRotation),
      baseline: fmt.us(base.cpuUsPerRotation),
      ratio: ours.cpuUsPerRotation / base.cpuUsPerRotation,
    });
    cpu.push({
      perUser: watchers / USERS,
      ours: ours.cpuUsPerRotation,
      base: base.cpuUsPerRotation,
    });
    rows.push({
      what: `all subscribed (first state everywhere), ${label}`,
      value: fmt.ms(ours.subscribeMs),
      baseline: fmt.ms(base.subscribeMs),
      ratio: ours.subscribeMs / base.subscribeMs,
    });
    for (const [name, m] of [
      ['broker', ours],
      ['bare', base],
    ] as const)
      notes.push(
        `${watchers} watchers, ${name}: ${m.rotations} rotations, ${m.latencies.length} of ` +
          `${m.expected} deliveries timed (${m.early} early, ${m.unmatched} unmatched, ` +
          `${m.errors} errors)`,
      );
  }
  // What one more watcher costs: the rotation itself cancels out between the sizes.
  const [fewest, most] = [cpu[0], cpu.at(-1)];
  if (fewest && most && most.perUser > fewest.perUser) {
    const per = (a: number, b: number) => (b - a) / (most.perUser - fewest.perUser);
    const ours = per(fewest.ours, most.ours);
    const base = per(fewest.base, most.base);
    rows.push({
      what: `server CPU per delivery (CPU per rotation, ${fewest.perUser} -> ${most.perUser} watchers per user)`,
      value: fmt.us(ours),
      baseline: fmt.us(base),
      ratio: ours / base,
    });
  }
  printTable(
    `Rotation to delivery: PUBLISH seen -> stream received, ${RATE} rotations/s, ` +
      `${SECONDS} s per size (baseline: bare grpc-js + ioredis SUBSCRIBE, same TLS)`,
    rows,
  );
  for (const note of notes) console.log(`  ${note}`);
  const stats = await idp.stats();
  console.log(`  IdP: ${stats.refreshes} refreshes, ${stats.reuses} reuses`);
} finally {
  client.close();
  publisher.disconnect();
  bare?.kill('SIGTERM');
  await broker.stop();
  await idp.stop();
  await redis.stopAll();
}
