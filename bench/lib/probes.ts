/**
 * Probes a benchmark reads of the processes it started: Redis command counts (INFO
 * commandstats), V8 GC pauses and heap sizes from a `--trace-gc` log, and a local OTLP/HTTP sink
 * that answers 200 to every export (telemetry on, without a collector's own cost).
 */
import { createServer } from 'node:http';
import { Redis } from 'ioredis';

/** Calls per command on one Redis node so far (INFO commandstats), `info` itself left out. */
export async function commandCalls(url: string): Promise<Map<string, number>> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1 });
  try {
    await redis.connect();
    const text = await redis.info('commandstats');
    const calls = new Map<string, number>();
    for (const match of text.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm))
      if (match[1] !== 'info') calls.set(match[1]!, Number(match[2]));
    return calls;
  } finally {
    redis.disconnect();
  }
}

/** Calls of each command between two snapshots, per `per` (e.g. per rotation), largest first. */
export function callsPer(
  before: Map<string, number>,
  after: Map<string, number>,
  per: number,
): { total: number; top: [string, number][] } {
  const delta: [string, number][] = [];
  for (const [name, calls] of after) {
    const d = calls - (before.get(name) ?? 0);
    if (d > 0) delta.push([name, d / Math.max(1, per)]);
  }
  delta.sort((a, b) => b[1] - a[1]);
  return { total: delta.reduce((sum, [, v]) => sum + v, 0), top: delta };
}

export function formatTop(top: [string, number][], count = 6): string {
  return top
    .slice(0, count)
    .map(([name, v]) => `${name} ${v.toFixed(2)}`)
    .join(', ');
}

export interface GcFigures {
  /** GC events seen. */
  events: number;
  /** The longest single pause (ms) as --trace-gc reports it (the atomic pause of that event). */
  maxPauseMs: number;
  /** Its kind (Scavenge, Mark-Compact, ...). */
  maxPauseKind: string;
  /** Sum of the pauses (ms). */
  totalPauseMs: number;
  /** The largest heap in use before a GC (MB, as V8 prints it). */
  maxHeapUsedMb: number;
  /** The largest heap committed (MB). */
  maxHeapCommittedMb: number;
}

// [pid:0x...]   1234 ms: Scavenge 3.8 (4.0) -> 3.4 (5.0) MB, 2.06 / 0.00 ms  (average mu = ...
// Newer V8 adds "(interleaved)" or "(reduce)" after the kind and "pooled: N MB, " before the pause.
const GC_LINE =
  /ms: (Scavenge|Mark-Compact|Mark-sweep|Minor Mark-Sweep)[^\d]*([\d.]+) \(([\d.]+)\) -> ([\d.]+) \(([\d.]+)\) MB, (?:pooled: [\d.]+ MB, )?([\d.]+) \/ [\d.]+ ms/g;

/** GC figures of a `--trace-gc` log (the part of a process' output since some point). */
export function gcFigures(log: string): GcFigures {
  const figures: GcFigures = {
    events: 0,
    maxPauseMs: 0,
    maxPauseKind: '',
    totalPauseMs: 0,
    maxHeapUsedMb: 0,
    maxHeapCommittedMb: 0,
  };
  for (const m of log.matchAll(GC_LINE)) {
    const pause = Number(m[6]);
    figures.events++;
    figures.totalPauseMs += pause;
    if (pause > figures.maxPauseMs) {
      figures.maxPauseMs = pause;
      figures.maxPauseKind = m[1]!;
    }
    figures.maxHeapUsedMb = Math.max(figures.maxHeapUsedMb, Number(m[2]));
    figures.maxHeapCommittedMb = Math.max(figures.maxHeapCommittedMb, Number(m[3]), Number(m[5]));
  }
  return figures;
}

/** An OTLP/HTTP sink on 127.0.0.1: reads each export and answers 200 with an empty body. */
export async function startOtlpSink(): Promise<{
  url: string;
  requests: () => number;
  close: () => Promise<void>;
}> {
  let requests = 0;
  const server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      requests++;
      // An empty Export*ServiceResponse: `{}` in JSON, zero bytes in protobuf.
      if (req.headers['content-type'] === 'application/json') {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': 2 });
        res.end('{}');
      } else {
        res.writeHead(200, { 'content-type': 'application/x-protobuf', 'content-length': 0 });
        res.end();
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    url: `http://127.0.0.1:${port}`,
    requests: () => requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
