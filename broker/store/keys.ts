import type { SessionRef } from './session-record.js';

/**
 * How many shards the state is split into. Fixed for good: a session's shard is derived from its
 * id, so changing the number would move every session (a new layout needs a migration).
 * Sixteen groups spread over a Redis Cluster's masters (each group is one hash slot), and cost a
 * single-node Redis nothing: the broker reads them with concurrent commands on one connection.
 */
export const STATE_SHARDS = 16;

/**
 * The one place that builds Redis keys.
 *
 * State layout (since issue 14): every state key carries the hash tag of its SHARD, `{s:K}` with
 * K = fnv1a(session id) mod 16, so a session's hash, its due-queue entry, its index entries and
 * its event channel live in ONE Redis Cluster slot. A commit then touches one slot (Cluster
 * requires it of a script) and still keeps the due queue and the indexes in the same atomic
 * step, while the queue and the events are spread over 16 slots instead of funnelling the whole
 * cluster through one.
 *
 *   {prefix}{s:K}:session:<id>   hash: gen, sealed, used, inflight
 *   {prefix}{s:K}:due            sorted set: id scored by when it is due (epoch ms)
 *   {prefix}{s:K}:index          sorted set: every id, score 0 (lexical listing)
 *   {prefix}{s:K}:reauth         sorted set: ids in REAUTH_REQUIRED, scored by since when
 *   {prefix}{s:K}:dead           sorted set: ids REVOKED / REAUTH_REQUIRED / IDLE, scored by
 *                                since when (the retention sweep deletes the old ones)
 *   {prefix}{s:K}:events         (sharded) pub/sub channel of SessionEvent messages
 *   {prefix}lock:{<id>}          Redlock resource, on the lock nodes (unchanged)
 *
 * The layout before it (`{prefix}session:{<id>}`, `{prefix}due`, `{prefix}index`,
 * `{prefix}reauth`) is the LEGACY layout; RedisSessionStore.migrateLegacy moves it over at start.
 * The prefix must not contain `{` or `}` (config checks), so the shard tag is the key's hash tag.
 * Tenant and user are percent-encoded, so `:`, `{` and `}` in ids cannot break a key or collide.
 */
export class KeySpace {
  constructor(readonly prefix: string) {}

  /** `enc(tenant):enc(user)`: unique, reversible, and free of `{`, `}` and extra `:`. */
  static sessionId(ref: SessionRef): string {
    return `${encodeURIComponent(ref.tenant)}:${encodeURIComponent(ref.user)}`;
  }

  static parseSessionId(id: string): SessionRef {
    const colon = id.indexOf(':');
    if (colon < 0) throw new Error(`malformed session id ${JSON.stringify(id)}`);
    return {
      tenant: decodeURIComponent(id.slice(0, colon)),
      user: decodeURIComponent(id.slice(colon + 1)),
    };
  }

  /** The shard (0..STATE_SHARDS-1) of a session id: 32-bit FNV-1a of its UTF-8 bytes. */
  static shardOf(id: string): number {
    let hash = 0x811c9dc5;
    for (const byte of Buffer.from(id, 'utf8')) {
      hash ^= byte;
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    return hash % STATE_SHARDS;
  }

  /** Every shard number, 0..STATE_SHARDS-1. */
  static get shards(): readonly number[] {
    return SHARD_NUMBERS;
  }

  private tag(shard: number): string {
    return `${this.prefix}{s:${shard}}:`;
  }

  /** Hash: gen, sealed, used, inflight. */
  session(ref: SessionRef): string {
    const id = KeySpace.sessionId(ref);
    return `${this.tag(KeySpace.shardOf(id))}session:${id}`;
  }

  /** Redlock resource of a session (on the lock nodes). */
  lock(ref: SessionRef): string {
    return `${this.prefix}lock:{${KeySpace.sessionId(ref)}}`;
  }

  /** The shard's due queue: session ids scored by when each is due for rotation (epoch ms). */
  due(shard: number): string {
    return `${this.tag(shard)}due`;
  }

  /** The shard's sorted set of every session id (score 0), listed in lexical order. */
  index(shard: number): string {
    return `${this.tag(shard)}index`;
  }

  /** The shard's ids of sessions in REAUTH_REQUIRED (scored by when they entered it), for the gauge. */
  reauth(shard: number): string {
    return `${this.tag(shard)}reauth`;
  }

  /**
   * The shard's ids of ACTIVE sessions without a login to fall back on whose token family ends
   * at a known time (scored by it, epoch ms), for the family-end gauge.
   */
  familyEnds(shard: number): string {
    return `${this.tag(shard)}family-ends`;
  }

  /** The shard's ids of REVOKED, REAUTH_REQUIRED and IDLE sessions, scored by since when. */
  dead(shard: number): string {
    return `${this.tag(shard)}dead`;
  }

  /** The shard's (sharded) pub/sub channel of SessionEvent messages. */
  events(shard: number): string {
    return `${this.tag(shard)}events`;
  }

  /** Keys of the layout before shards (read only by the migration). */
  get legacy() {
    const p = this.prefix;
    return {
      session: (id: string) => `${p}session:{${id}}`,
      due: `${p}due`,
      index: `${p}index`,
      reauth: `${p}reauth`,
    };
  }
}

const SHARD_NUMBERS: readonly number[] = Array.from({ length: STATE_SHARDS }, (_, i) => i);
