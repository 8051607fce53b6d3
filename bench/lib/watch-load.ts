/**
 * A Watch load client for bench/delivery.ts, run as its own process (child_process.fork) so its
 * CPU is not the measured server's. It opens Watch streams the way a sidecar does (one
 * bidirectional stream subscribing several users, TLS and a ServiceAccount token) over a few
 * channels of their own (separate HTTP/2 connections), and a plain ioredis SUBSCRIBE on the same
 * event channels the server listens to.
 *
 * What it measures, per (user, stream): from the moment this process saw the PUBLISH of a
 * generation (the commit's moment: the broker publishes right after the state store acknowledged
 * the write) to the moment this stream received that generation. Both instants are read with
 * performance.now() in this one process, so there is no clock skew. A receipt that arrives before
 * its PUBLISH was read here (same poll round) counts as 0 ms and is counted as "early".
 *
 * Messages (IPC): parent -> { type: 'start', ...LoadSpec } | { type: 'measure' } | { type: 'stop' };
 * child -> { type: 'spawned' } | { type: 'ready' } | { type: 'result', ...LoadResult } |
 * { type: 'failed', message }.
 */
import * as grpc from '@grpc/grpc-js';
import { Redis } from 'ioredis';
import { performance } from 'node:perf_hooks';
import {
  TokenBrokerServiceClient,
  type WatchRequest,
  type WatchResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';
import { clientTransport } from '../../shared/grpc-client-credentials.js';

export interface LoadSpec {
  address: string;
  caFile: string;
  serverName: string;
  tokenFile: string;
  redisUrl: string;
  /** The pub/sub channels the server's events go out on. */
  eventChannels: string[];
  /** Each stream's users, as `tenant/user`. */
  streams: string[][];
  /** Channels (HTTP/2 connections) the streams are spread over. */
  connections: number;
}

export interface LoadResult {
  /** Milliseconds from PUBLISH seen to receipt, one per (user, stream, generation). */
  latencies: number[];
  /** Receipts read before their PUBLISH was (counted as 0 ms). */
  early: number;
  /** Receipts of a generation whose PUBLISH was never seen while measuring. */
  unmatched: number;
  /** WatchErrors received. */
  errors: number;
}

type Parent = { type: 'start' } & LoadSpec;

const send = (message: unknown) => process.send?.(message);

async function run(spec: LoadSpec): Promise<void> {
  const transport = clientTransport({
    tls: { caFile: spec.caFile, serverName: spec.serverName },
    tokenFile: spec.tokenFile,
  });
  const clients = Array.from(
    { length: spec.connections },
    (_, i) =>
      new TokenBrokerServiceClient(spec.address, transport.credentials, {
        ...transport.options,
        // Each client its own connection, as separate sidecars have.
        'grpc.use_local_subchannel_pool': 1,
        'grpc.bench_connection': i,
        'grpc.max_receive_message_length': 64 * 1024 * 1024,
        interceptors: transport.interceptors,
      }),
  );
  let measuring = false;
  /** `tenant/user/generation` -> when its PUBLISH was read. */
  const published = new Map<string, number>();
  /** Receipts read before their PUBLISH: key -> count. */
  const ahead = new Map<string, number>();
  const result: LoadResult = { latencies: [], early: 0, unmatched: 0, errors: 0 };

  const redis = new Redis(spec.redisUrl, { lazyConnect: true, maxRetriesPerRequest: null });
  await redis.connect();
  redis.on('message', (_channel: string, message: string) => {
    if (!measuring) return;
    const now = performance.now();
    const event = JSON.parse(message) as { tenant: string; user: string; generation: number };
    const key = `${event.tenant}/${event.user}/${event.generation}`;
    published.set(key, now);
    const early = ahead.get(key);
    if (early !== undefined) {
      ahead.delete(key);
      for (let i = 0; i < early; i++) result.latencies.push(0);
      result.early += early;
    }
  });
  await redis.subscribe(...spec.eventChannels);

  let waiting = spec.streams.reduce((n, users) => n + users.length, 0);
  const calls: grpc.ClientDuplexStream<WatchRequest, WatchResponse>[] = [];
  spec.streams.forEach((users, index) => {
    const call = clients[index % clients.length]!.watch();
    calls.push(call);
    const seen = new Set<string>();
    call.on('data', (response: WatchResponse) => {
      const event = response.event;
      if (event?.$case === 'error') {
        result.errors++;
        return;
      }
      if (event?.$case !== 'token') return;
      const now = performance.now();
      const { tenant, user, generation } = event.value;
      const id = `${tenant}/${user}`;
      if (!seen.has(id)) {
        seen.add(id);
        if (--waiting === 0) send({ type: 'ready' });
      }
      if (!measuring) return;
      const key = `${id}/${generation}`;
      const at = published.get(key);
      if (at !== undefined) result.latencies.push(now - at);
      else ahead.set(key, (ahead.get(key) ?? 0) + 1);
    });
    call.on('error', (err: grpc.ServiceError) => {
      if (err.code !== grpc.status.CANCELLED) send({ type: 'failed', message: err.message });
    });
    for (const name of users) {
      const [tenant, user] = name.split('/') as [string, string];
      call.write({
        action: { $case: 'subscribe', value: { tenant, user, afterGeneration: 0, epoch: '' } },
      });
    }
  });

  process.on('message', (message: { type: string }) => {
    if (message.type === 'measure') {
      measuring = true;
      return;
    }
    if (message.type !== 'stop') return;
    measuring = false;
    for (const count of ahead.values()) result.unmatched += count;
    for (const call of calls) call.cancel();
    for (const client of clients) client.close();
    redis.disconnect();
    // Exits once the (large) answer is handed over.
    process.send?.({ type: 'result', ...result }, () => process.exit(0));
  });
}

send({ type: 'spawned' });
process.once('message', (message: Parent) => {
  if (message.type !== 'start') return;
  run(message).catch((err: unknown) => {
    send({ type: 'failed', message: String(err) });
    process.exit(1);
  });
});
process.on('disconnect', () => process.exit(0));
