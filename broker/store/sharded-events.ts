import { Redis, type Cluster, type RedisOptions } from 'ioredis';
import type { Logger } from 'pino';

/**
 * Sharded pub/sub (SSUBSCRIBE, Redis >= 7) over a Redis Cluster: each shard channel is subscribed
 * on the master that serves its slot, one connection per master. When any of those connections
 * closes or the server moves a channel away (unsolicited `sunsubscribe`, a failover or a slot
 * move), every subscription is rebuilt from a fresh slot map and `onResync` is called, since
 * events published meanwhile may have been missed. Retries until `close`.
 */
export class ShardedEventSubscriber {
  private connections: Redis[] = [];
  private closed = false;
  private rebuilding: Promise<void> | undefined;

  constructor(
    /** The store's cluster client: asked for the slot map (it follows failovers itself). */
    private readonly cluster: Cluster,
    private readonly nodeOptions: RedisOptions,
    private readonly channels: readonly string[],
    private readonly deliver: (channel: string, message: string) => void,
    private readonly onResync: () => void,
    private readonly log: Logger,
    /** Called when a connection closes or moves: events may be missed until `onResync`. */
    private readonly onDown: () => void = () => {},
  ) {}

  /** Subscribes every channel; rejects when the first attempt fails. */
  async start(): Promise<void> {
    await this.subscribeAll();
  }

  private async subscribeAll(): Promise<void> {
    const slots = await this.slotMap();
    const owner = (slot: number) => {
      const range = slots.find(([from, to]) => slot >= from && slot <= to);
      if (!range) throw new Error(`no master serves slot ${slot} yet`);
      return `${range[2][0]}:${range[2][1]}`;
    };
    const byNode = new Map<string, string[]>();
    for (const channel of this.channels) {
      const slot = keySlot(channel);
      const node = owner(slot);
      byNode.set(node, [...(byNode.get(node) ?? []), channel]);
    }
    const connections: Redis[] = [];
    try {
      for (const [node, channels] of byNode) {
        const colon = node.lastIndexOf(':');
        const connection = new Redis({
          ...this.nodeOptions,
          host: node.slice(0, colon),
          port: Number(node.slice(colon + 1)),
          // A lost connection means a changed topology: rebuild, do not reconnect here.
          retryStrategy: () => null,
          lazyConnect: true,
        });
        connections.push(connection);
        connection.on('error', (err: Error) =>
          this.log.warn({ err: err.message, node }, 'events connection error'),
        );
        connection.on('smessage', this.deliver);
        await connection.connect();
        for (const channel of channels) await connection.ssubscribe(channel);
        const rebuild = () => this.rebuild();
        connection.once('close', rebuild);
        connection.once('moved', rebuild);
      }
    } catch (err) {
      for (const c of connections) c.disconnect();
      throw err;
    }
    this.connections = connections;
  }

  /** CLUSTER SLOTS from the first node that answers within a second (a dead one may hang). */
  private async slotMap(): Promise<[number, number, [string, number, ...unknown[]]][]> {
    let last: unknown = new Error('no cluster node known');
    for (const node of this.cluster.nodes('all')) {
      try {
        return (await Promise.race([
          node.call('CLUSTER', 'SLOTS'),
          new Promise((_, reject) =>
            setTimeout(() => reject(new Error('no answer')), 1_000).unref(),
          ),
        ])) as [number, number, [string, number, ...unknown[]]][];
      } catch (err) {
        last = err;
      }
    }
    throw last;
  }

  private rebuild(): void {
    if (this.closed || this.rebuilding) return;
    this.onDown();
    this.rebuilding = (async () => {
      for (const c of this.connections) {
        c.removeAllListeners('close');
        c.removeAllListeners('moved');
        c.disconnect();
      }
      this.connections = [];
      for (let attempt = 1; !this.closed; attempt++) {
        await new Promise((r) => setTimeout(r, Math.min(1_000, 100 * attempt)));
        try {
          await this.subscribeAll();
          this.log.info('event subscriptions moved to the current masters');
          this.onResync();
          return;
        } catch (err) {
          this.log.warn({ err: String(err), attempt }, 'resubscribing to events failed; retrying');
        }
      }
    })().finally(() => (this.rebuilding = undefined));
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.rebuilding;
    for (const c of this.connections) {
      c.removeAllListeners('close');
      c.removeAllListeners('moved');
      await c.quit().catch(() => c.disconnect());
    }
    this.connections = [];
  }
}

/** The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (or whole key) mod 16384. */
export function keySlot(key: string): number {
  const open = key.indexOf('{');
  const close = open >= 0 ? key.indexOf('}', open + 1) : -1;
  const hashed = Buffer.from(close > open + 1 ? key.slice(open + 1, close) : key, 'utf8');
  let crc = 0;
  for (const byte of hashed) {
    crc ^= byte << 8;
    for (let i = 0; i < 8; i++)
      crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc % 16_384;
}
