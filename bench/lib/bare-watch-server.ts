/**
 * The baseline of bench/delivery.ts, run as its own process: a bare grpc-js server with the
 * broker's service definition and the same TLS (the dev certificate), whose Watch keeps a set of
 * streams per user, and a plain ioredis SUBSCRIBE on the event channels. On each PUBLISH it writes
 * one TokenEvent of the broker's shape and size to every stream watching that user, straight
 * through grpc-js (call.write per stream, grpc-js serialising each). No state read, no unsealing,
 * no authentication, no queue: the parts every delivery needs (Redis pub/sub, grpc-js, HTTP/2,
 * TLS) and nothing of the broker's own.
 *
 * Parent -> { type: 'start', certFile, keyFile, redisUrl, eventChannels, shape }; child ->
 * { type: 'listening', port }. SIGTERM or a disconnect ends it.
 */
import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { Redis } from 'ioredis';
import {
  SessionStatus,
  TokenBrokerServiceService,
  type TokenEvent,
  type WatchRequest,
  type WatchResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';

export interface BareShape {
  /** Lengths of the broker's token event fields, so the baseline writes as many bytes. */
  accessToken: number;
  traceparent: number;
  epoch: number;
}

interface Start {
  type: 'start';
  certFile: string;
  keyFile: string;
  redisUrl: string;
  eventChannels: string[];
  shape: BareShape;
}

type Call = grpc.ServerDuplexStream<WatchRequest, WatchResponse>;

async function run(start: Start): Promise<void> {
  const watchers = new Map<string, Set<Call>>();
  const fill = (n: number) => 'x'.repeat(n);
  const event = (tenant: string, user: string, generation: number): TokenEvent => ({
    tenant,
    user,
    generation,
    status: SessionStatus.SESSION_STATUS_ACTIVE,
    accessToken: fill(start.shape.accessToken),
    tokenType: 'Bearer',
    expiresAt: new Date(Date.now() + 3_600_000),
    traceparent: fill(start.shape.traceparent),
    tracestate: '',
    errorCode: '',
    epoch: fill(start.shape.epoch),
    issuedAt: new Date(),
  });

  const server = new grpc.Server();
  server.addService(TokenBrokerServiceService, {
    watch: (call: Call) => {
      const mine = new Set<string>();
      const done = () => {
        for (const id of mine) watchers.get(id)?.delete(call);
      };
      call.on('cancelled', done);
      call.on('error', done);
      call.on('end', () => {
        done();
        call.end();
      });
      call.on('data', (request: WatchRequest) => {
        if (request.action?.$case !== 'subscribe') return;
        const { tenant, user } = request.action.value;
        const id = `${tenant}/${user}`;
        mine.add(id);
        let set = watchers.get(id);
        if (!set) watchers.set(id, (set = new Set()));
        set.add(call);
        // The current state at once, as the broker sends it.
        call.write({ event: { $case: 'token', value: event(tenant, user, 0) } });
      });
    },
  });

  const redis = new Redis(start.redisUrl, { lazyConnect: true, maxRetriesPerRequest: null });
  await redis.connect();
  redis.on('message', (_channel: string, message: string) => {
    const e = JSON.parse(message) as { tenant: string; user: string; generation: number };
    const set = watchers.get(`${e.tenant}/${e.user}`);
    if (!set) return;
    const response: WatchResponse = {
      event: { $case: 'token', value: event(e.tenant, e.user, e.generation) },
    };
    for (const call of set) call.write(response);
  });
  await redis.subscribe(...start.eventChannels);

  const credentials = grpc.ServerCredentials.createSsl(
    null,
    [{ cert_chain: readFileSync(start.certFile), private_key: readFileSync(start.keyFile) }],
    false,
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', credentials, (err, bound) =>
      err ? reject(err) : resolve(bound),
    ),
  );
  process.send?.({ type: 'listening', port });
  const stop = () => {
    server.forceShutdown();
    redis.disconnect();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('disconnect', stop);
}

process.once('message', (message: Start) => {
  if (message.type !== 'start') return;
  run(message).catch((err: unknown) => {
    console.error(String(err));
    process.exit(1);
  });
});
