/**
 * A small keep-alive HTTP/1.1 load generator: `connections` sockets to 127.0.0.1, each sending
 * the same GET as soon as the previous answer is complete, for `durationMs`. Light enough that
 * one core of it keeps a one-core node:http server busy. It only ever connects to 127.0.0.1.
 */
import { connect, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';

export interface LoadOptions {
  port: number;
  path: string;
  /** When given, each connection cycles through these paths instead of sending `path`. */
  paths?: readonly string[];
  headers: Record<string, string>;
  connections: number;
  durationMs: number;
}

export interface LoadResult {
  requests: number;
  /** Answers with a status other than 200. */
  non200: number;
  seconds: number;
  /** Per-request latency in ms, sorted. */
  latencies: Float64Array;
}

const HEADER_END = Buffer.from('\r\n\r\n');

export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const head =
    Object.entries(options.headers)
      .map(([k, v]) => `${k}: ${v}\r\n`)
      .join('') + '\r\n';
  const requests = (options.paths ?? [options.path]).map((path) =>
    Buffer.from(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${options.port}\r\n${head}`),
  );
  // Connections start at different places in the cycle, so they read different paths at once.
  let nextStart = 0;
  let latencies = new Float64Array(1 << 20);
  let count = 0;
  let non200 = 0;
  const started = performance.now();
  const deadline = started + options.durationMs;

  const record = (ms: number) => {
    if (count === latencies.length) {
      const bigger = new Float64Array(latencies.length * 2);
      bigger.set(latencies);
      latencies = bigger;
    }
    latencies[count++] = ms;
  };

  const one = () =>
    new Promise<void>((resolve, reject) => {
      const socket: Socket = connect({ host: '127.0.0.1', port: options.port, noDelay: true });
      let buffer: Buffer = Buffer.alloc(0);
      let sentAt = 0;
      let at = nextStart;
      nextStart = (nextStart + Math.ceil(requests.length / options.connections)) % requests.length;
      const send = () => {
        if (performance.now() >= deadline) {
          socket.end();
          resolve();
          return;
        }
        sentAt = performance.now();
        socket.write(requests[at]!);
        at = at + 1 === requests.length ? 0 : at + 1;
      };
      socket.on('connect', send);
      socket.on('error', reject);
      socket.on('data', (chunk: Buffer) => {
        buffer = buffer.length === 0 ? chunk : Buffer.concat([buffer, chunk]);
        const headerEnd = buffer.indexOf(HEADER_END);
        if (headerEnd < 0) return;
        const head = buffer.toString('latin1', 0, headerEnd);
        const length = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? 0);
        const total = headerEnd + 4 + length;
        if (buffer.length < total) return;
        if (!head.startsWith('HTTP/1.1 200')) non200++;
        buffer = buffer.subarray(total);
        record(performance.now() - sentAt);
        send();
      });
    });

  await Promise.all(Array.from({ length: options.connections }, one));
  const seconds = (performance.now() - started) / 1000;
  const sorted = latencies.slice(0, count).sort();
  return { requests: count, non200, seconds, latencies: sorted };
}

export function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}
