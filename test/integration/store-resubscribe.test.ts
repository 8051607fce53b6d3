/**
 * The state store's event subscription across a reconnect, on a real Redis behind a TCP proxy
 * that can hold back what the client sends. The store resubscribes itself after every reconnect
 * (with a catch, then a resync); ioredis must not resubscribe on its own as well, whose promise no
 * one holds: closing the store while that SUBSCRIBE is unanswered (a broker stopping during a
 * Redis failover) rejected it as an unhandled "Connection is closed.", which crashes a Node.js
 * process at shutdown.
 */
import { createServer, connect as tcpConnect, type Server, type Socket } from 'node:net';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateSealingKey, Sealer } from '../../broker/sealing.js';
import { RedisSessionStore } from '../../broker/store/redis-session-store.js';
import { eventually } from '../../scripts/dev/broker-client.js';
import { randomPrefix } from '../../scripts/dev/broker-env.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

interface Proxy {
  port: number;
  /** While true, client chunks that carry a SUBSCRIBE are kept back (never forwarded). */
  holdSubscribes: boolean;
  /** SUBSCRIBE chunks kept back so far. */
  held: number;
  /** Cuts every proxied connection (both sides), as a failover or a network blip does. */
  cutAll(): void;
  connections(): number;
  close(): Promise<void>;
}

async function startProxy(upstreamPort: number): Promise<Proxy> {
  const pairs = new Set<[Socket, Socket]>();
  const proxy: Proxy = {
    port: 0,
    holdSubscribes: false,
    held: 0,
    cutAll: () => {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      pairs.clear();
    },
    connections: () => pairs.size,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
  const server: Server = createServer((client) => {
    const upstream = tcpConnect(upstreamPort, '127.0.0.1');
    const pair: [Socket, Socket] = [client, upstream];
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.on('data', (chunk: Buffer) => {
      if (proxy.holdSubscribes && /subscribe/i.test(chunk.toString('latin1'))) {
        proxy.held++;
        return;
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => client.write(chunk));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  proxy.port = (server.address() as { port: number }).port;
  return proxy;
}

let redis: RedisNodes;
let proxy: Proxy;
const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown) => unhandled.push(reason);

beforeAll(async () => {
  redis = await startRedisNodes(1);
  proxy = await startProxy(redis.nodes[0]!.port);
  process.on('unhandledRejection', onUnhandled);
});

afterAll(async () => {
  process.off('unhandledRejection', onUnhandled);
  proxy?.cutAll();
  await proxy?.close();
  await redis?.stopAll();
});

describe('the event subscription across a reconnect', () => {
  it('is renewed once by the store, and closing it mid-resubscribe leaves no unhandled rejection', async () => {
    const store = new RedisSessionStore(
      {
        target: { kind: 'single', url: `redis://127.0.0.1:${proxy.port}` },
        prefix: randomPrefix(),
        minReplicas: 0,
        waitTimeoutMs: 500,
      },
      new Sealer([generateSealingKey('resubscribe')]),
      pino({ level: 'silent' }),
    );
    await store.waitReady(10_000);
    await store.prepare();
    let resyncs = 0;
    await store.subscribe(
      () => {},
      () => resyncs++,
    );

    // A reconnect with nothing held: the store resubscribes and resyncs.
    proxy.cutAll();
    await eventually(() => Promise.resolve(resyncs === 1), 10_000, 'a resync after reconnecting');

    // Now every SUBSCRIBE is held unanswered, and the store closes while it waits.
    proxy.holdSubscribes = true;
    const held = proxy.held;
    proxy.cutAll();
    await eventually(
      () => Promise.resolve(proxy.held > held),
      10_000,
      'the resubscription sent after the reconnect',
    );
    await store.close();
    // Rejections are reported after the microtasks that follow the close.
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(unhandled.map(String)).toEqual([]);
    // Exactly one SUBSCRIBE per reconnect: the store's own, not ioredis's as well.
    expect(proxy.held - held).toBe(1);
    expect(resyncs).toBe(1);
  });
});
