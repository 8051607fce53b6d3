import { Cluster, Redis, type ClusterOptions, type RedisOptions } from 'ioredis';
import type { Logger } from 'pino';
import type { RedisTls, StateStoreConfig } from '../config.js';
import { BrokerError, SealError, StateNotReplicatedError, UnavailableError } from '../errors.js';
import type { Sealer } from '../sealing.js';
import { autoPipeliningAllowed } from './auto-pipelining.js';
import { KeySpace, STATE_SHARDS } from './keys.js';
import type { Transition } from '../session-transitions.js';
import {
  CLAIM_DUE,
  CLAIM_DUE_SHARDS,
  COMMIT_SESSION,
  MARK_INFLIGHT,
  MIGRATE_LEGACY,
  NEXT_DUE_SHARDS,
  SWEEP_DEAD,
  TOUCH_SESSION,
} from './redis-scripts.js';
import { ShardedEventSubscriber } from './sharded-events.js';
import {
  DEAD_STATUSES,
  epochOf,
  type InflightMarker,
  type SessionEvent,
  type SessionRecord,
  type SessionRef,
  type StoredSession,
} from './session-record.js';
import {
  familyEndOf,
  type DueClaim,
  type MarkResult,
  type SessionCounts,
  type SessionPage,
  type SessionStore,
} from './session-store.js';

interface ScriptCommands {
  tbCommit(...keysAndArgs: string[]): Promise<number>;
  tbMark(key: string, due: string, ...args: string[]): Promise<[number, number]>;
  tbTouch(key: string, now: string): Promise<number>;
  /** Flat pairs: id, due time, id, due time, ... */
  tbClaim(key: string, now: string, limit: string, leaseUntil: string): Promise<string[]>;
  /** Every shard's due key, then now, limit, lease end, first shard: flat pairs as tbClaim. */
  tbClaimShards(...keysAndArgs: string[]): Promise<string[]>;
  tbNextDue(...keys: string[]): Promise<string | null>;
  tbSweep(...keysAndArgs: string[]): Promise<number>;
  tbMigrate(...keysAndArgs: string[]): Promise<number>;
}

type Client = (Redis | Cluster) & ScriptCommands;

export interface RedisStoreOptions {
  target: StateStoreConfig;
  prefix: string;
  /** Replicas that must acknowledge a commit; undefined: detected by `prepare` (see there). */
  minReplicas: number | undefined;
  /** One WAIT lasts at most this long; then the commit throws StateNotReplicatedError. */
  waitTimeoutMs: number;
}

const COMMAND_TIMEOUT_MS = 5_000;
const MIGRATION_BATCH = 200;

/**
 * Session state in Redis (one node, a Sentinel-monitored master, or a Cluster), records sealed
 * with JWE; see keys.ts for the sharded layout and redis-scripts.ts for the atomic steps.
 */
export class RedisSessionStore implements SessionStore {
  private readonly redis: Client;
  private subscriber: Redis | Cluster | undefined;
  private sharded: ShardedEventSubscriber | undefined;
  private readonly keys: KeySpace;
  private readonly cluster: boolean;
  private minReplicas: number;
  /** The sealed bytes of each transition, so a retried commit is recognisably the same write. */
  private readonly sealedOf = new WeakMap<Transition, string>();

  constructor(
    private readonly options: RedisStoreOptions,
    private readonly sealer: Sealer,
    private readonly log: Logger,
    /** Told of each record that could not be opened (the broker counts them in a metric). */
    private readonly onUnreadable: (code: SealError['code']) => void = () => {},
  ) {
    this.keys = new KeySpace(options.prefix);
    this.cluster = options.target.kind === 'cluster';
    this.minReplicas = options.minReplicas ?? 0;
    // Commands issued in the same tick go out in one write per node (auto-pipelining): the
    // rotations in flight and the shard fan-outs share socket writes instead of one per command.
    const redis = connect(options.target, 'commands');
    redis.on('error', (err: Error) => log.warn({ err: err.message }, 'state store error'));
    redis.defineCommand('tbCommit', { numberOfKeys: 6, lua: COMMIT_SESSION });
    redis.defineCommand('tbMark', { numberOfKeys: 2, lua: MARK_INFLIGHT });
    redis.defineCommand('tbTouch', { numberOfKeys: 1, lua: TOUCH_SESSION });
    redis.defineCommand('tbClaim', { numberOfKeys: 1, lua: CLAIM_DUE });
    redis.defineCommand('tbClaimShards', { numberOfKeys: STATE_SHARDS, lua: CLAIM_DUE_SHARDS });
    redis.defineCommand('tbNextDue', { numberOfKeys: STATE_SHARDS, lua: NEXT_DUE_SHARDS });
    // The sweep's key count varies: it is passed first, as EVALSHA takes it.
    redis.defineCommand('tbSweep', { lua: SWEEP_DEAD });
    redis.defineCommand('tbMigrate', { numberOfKeys: 9, lua: MIGRATE_LEGACY });
    this.redis = redis as Client;
  }

  // Every store call: a Redis failure (connection lost, failover in progress, READONLY from a
  // demoted master) is UNAVAILABLE to callers, a retryable condition, not an internal error.

  get(ref: SessionRef): Promise<StoredSession | undefined> {
    return unavailableOnFailure(this.getRaw(ref));
  }

  commit(transition: Transition, expectedGeneration: number | null, now: number): Promise<boolean> {
    return unavailableOnFailure(this.commitRaw(transition, expectedGeneration, now));
  }

  markInflight(
    ref: SessionRef,
    marker: InflightMarker,
    now: number,
    requeueAt?: number,
  ): Promise<MarkResult> {
    return unavailableOnFailure(this.markInflightRaw(ref, marker, now, requeueAt));
  }

  touch(ref: SessionRef, now: number): Promise<void> {
    return unavailableOnFailure(this.touchRaw(ref, now));
  }

  schedule(ref: SessionRef, at: number): Promise<void> {
    return unavailableOnFailure(this.scheduleRaw(ref, at));
  }

  unschedule(ref: SessionRef): Promise<void> {
    return unavailableOnFailure(this.unscheduleRaw(ref));
  }

  claimDue(now: number, limit: number, leaseUntil: number): Promise<DueClaim[]> {
    return unavailableOnFailure(this.claimDueRaw(now, limit, leaseUntil));
  }

  sessionCounts(): Promise<SessionCounts> {
    return unavailableOnFailure(this.sessionCountsRaw());
  }

  nextDueAt(): Promise<number | undefined> {
    return unavailableOnFailure(this.nextDueAtRaw());
  }

  familyEndCounts(now: number, horizonsMs: readonly number[]): Promise<number[]> {
    return unavailableOnFailure(this.familyEndCountsRaw(now, horizonsMs));
  }

  list(tenant: string, after: string, limit: number): Promise<SessionPage> {
    return unavailableOnFailure(this.listRaw(tenant, after, limit));
  }

  sweepDead(cutoff: number, limit: number): Promise<number> {
    return unavailableOnFailure(this.sweepDeadRaw(cutoff, limit));
  }

  /** The setting start-up errors name when the store cannot be reached. */
  get setting(): string {
    return {
      single: 'TB_REDIS_URL',
      sentinel: 'TB_REDIS_SENTINELS',
      cluster: 'TB_REDIS_CLUSTER_NODES',
    }[this.options.target.kind];
  }

  /**
   * Resolves once Redis answers a PING; rejects with the last error after `timeoutMs`. Start-up
   * uses it so an unreachable or misconfigured state store fails at once, naming the variable.
   */
  async waitReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      try {
        await Promise.race([
          this.redis.ping(),
          new Promise((_, reject) => {
            const timer = setTimeout(() => reject(new Error('no answer')), Math.max(1, left));
            timer.unref();
          }),
        ]);
        return;
      } catch (err) {
        if (Date.now() + 100 >= deadline) throw err;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  }

  /**
   * After waitReady: settles how many replicas a commit waits for, and moves sessions of the
   * legacy layout (before shards) into their shards. Without TB_REDIS_MIN_REPLICAS a single URL
   * waits for 1 replica when its master has any (ROLE) and for none otherwise; Sentinel and Cluster
   * are replicated shapes, so they wait for 1.
   */
  async prepare(): Promise<{ replicas: number; minReplicas: number; migrated: number }> {
    const replicas = await this.countReplicas();
    this.minReplicas =
      this.options.minReplicas ??
      (this.options.target.kind === 'single' ? (replicas > 0 ? 1 : 0) : 1);
    if (this.minReplicas > replicas)
      this.log.error(
        { replicas, minReplicas: this.minReplicas },
        'the state store has fewer replicas than each commit waits for: rotations stall until ' +
          'they connect (TB_REDIS_MIN_REPLICAS=0 accepts losing the newest write on a failover)',
      );
    const migrated = this.cluster ? 0 : await this.migrateLegacy();
    return { replicas, minReplicas: this.minReplicas, migrated };
  }

  /** Replicas connected to the master (Cluster: the fewest any master has). */
  private async countReplicas(): Promise<number> {
    const replicasOf = async (node: Redis) => {
      const role = (await node.call('ROLE')) as [string, number, unknown[]];
      return role[0] === 'master' ? role[2].length : 0;
    };
    if (this.redis instanceof Cluster) {
      const masters = this.redis.nodes('master');
      const counts = await Promise.all(masters.map(replicasOf));
      return counts.length === 0 ? 0 : Math.min(...counts);
    }
    return replicasOf(this.redis);
  }

  /**
   * Moves every session of the legacy layout into its shard (single Redis and Sentinel: the
   * legacy layout never ran on a Cluster). Each move is one atomic script and idempotent, so
   * replicas starting together may all run it. Returns how many sessions this call moved.
   */
  async migrateLegacy(): Promise<number> {
    const legacy = this.keys.legacy;
    let moved = 0;
    for (;;) {
      const ids = await this.redis.zrange(legacy.index, '0', String(MIGRATION_BATCH - 1));
      if (ids.length === 0) break;
      for (const id of ids) {
        const ref = KeySpace.parseSessionId(id);
        const shard = KeySpace.shardOf(id);
        const sealed = await this.redis.hget(legacy.session(id), 'sealed');
        let dead = false;
        if (sealed)
          try {
            const record = (await this.sealer.open(sealed, id)) as SessionRecord;
            dead = DEAD_STATUSES.has(record.status);
          } catch {
            // Unreadable here is unreadable later too: move it as it is, reads will say so.
          }
        moved += await this.redis.tbMigrate(
          legacy.session(id),
          legacy.due,
          legacy.index,
          legacy.reauth,
          this.keys.session(ref),
          this.keys.due(shard),
          this.keys.index(shard),
          this.keys.reauth(shard),
          this.keys.dead(shard),
          id,
          dead ? '1' : '0',
          String(Date.now()),
        );
      }
    }
    if (moved > 0)
      this.log.warn({ moved }, 'moved sessions of the legacy key layout into their shards');
    return moved;
  }

  private async getRaw(ref: SessionRef): Promise<StoredSession | undefined> {
    const [sealed, used, inflight] = await this.redis.hmget(
      this.keys.session(ref),
      'sealed',
      'used',
      'inflight',
    );
    if (!sealed) return undefined;
    return this.open(ref, sealed, used, inflight);
  }

  private async open(
    ref: SessionRef,
    sealed: string,
    used: string | null | undefined,
    inflight: string | null | undefined,
  ): Promise<StoredSession> {
    let record: SessionRecord;
    try {
      record = (await this.sealer.open(sealed, KeySpace.sessionId(ref))) as SessionRecord;
    } catch (err) {
      if (err instanceof SealError) {
        this.onUnreadable(err.code);
        this.log.error(
          { tenant: ref.tenant, user: ref.user, kid: err.kid, code: err.code },
          `session state unreadable: ${err.message}` +
            (err.code === 'SEALING_KEY_UNKNOWN'
              ? ' (TB_SEALING_KEYS lacks that key: put it back, after the sealing one)'
              : ''),
        );
      }
      throw err;
    }
    return {
      record,
      lastUsedAt: Number(used ?? 0),
      inflight: inflight ? (JSON.parse(inflight) as InflightMarker) : undefined,
    };
  }

  /**
   * The compare-and-set script and, in the same round trip on the same connection, WAIT for the
   * required replicas. Only an acknowledged write counts: otherwise StateNotReplicatedError, and
   * the event is NOT published. A retry of the same transition (same sealed bytes) finds its own
   * write (script answer 2) and waits again, or, after a failover that lost it, writes it again.
   * The event goes out after the acknowledgement, so no watcher sees a generation a failover
   * could still take back.
   */
  private async commitRaw(
    transition: Transition,
    expectedGeneration: number | null,
    now: number,
  ): Promise<boolean> {
    const record: SessionRecord = transition.next;
    const id = KeySpace.sessionId(record);
    const shard = KeySpace.shardOf(id);
    let sealed = this.sealedOf.get(transition);
    if (sealed === undefined) {
      sealed = await this.sealer.seal(record, id);
      this.sealedOf.set(transition, sealed);
    }
    const dead = DEAD_STATUSES.has(record.status);
    const publishes = expectedGeneration !== record.generation;
    const payload = publishes ? JSON.stringify(eventOf(record)) : '';
    // Nothing to wait for: the script publishes itself, saving a command (not on a Cluster,
    // whose events are sharded channels published on the shard's master).
    const inScript = publishes && this.minReplicas === 0 && !this.cluster;
    const args = [
      this.keys.session(record),
      this.keys.due(shard),
      this.keys.index(shard),
      this.keys.reauth(shard),
      this.keys.dead(shard),
      this.keys.familyEnds(shard),
      expectedGeneration === null ? '' : String(expectedGeneration),
      String(record.generation),
      sealed,
      String(now),
      id,
      transition.dueAt === undefined ? '' : String(transition.dueAt),
      record.status === 'REAUTH_REQUIRED' ? '1' : '0',
      dead ? '1' : '0',
      String(familyEndOf(record) ?? ''),
      inScript ? this.keys.events(shard) : '',
      inScript ? payload : '',
    ];
    let result: number;
    if (this.minReplicas === 0) result = await this.redis.tbCommit(...args);
    else {
      const replies = await this.withWait((p) => p.tbCommit(...args));
      result = Number(replies.result);
      if (result !== 0) replies.check();
    }
    if (result === 0) return false;
    if (publishes && !inScript) {
      if (this.redis instanceof Cluster)
        await this.redis.spublish(this.keys.events(shard), payload);
      else await this.redis.publish(this.keys.events(shard), payload);
    }
    return true;
  }

  /**
   * Marks the presentation in flight. The mark is waited for like a commit: a refresh token is
   * presented only when its outcome could be stored durably now (a shard whose master has lost
   * its replicas refuses here, before the IdP consumes anything, not after).
   */
  private async markInflightRaw(
    ref: SessionRef,
    marker: InflightMarker,
    now: number,
    requeueAt: number | undefined,
  ): Promise<MarkResult> {
    const args = [
      this.keys.session(ref),
      this.dueOf(ref),
      String(marker.generation),
      JSON.stringify(marker),
      String(now),
      KeySpace.sessionId(ref),
      requeueAt === undefined ? '' : String(requeueAt),
    ] as const;
    let status: number;
    let value: number;
    if (this.minReplicas === 0) [status, value] = await this.redis.tbMark(...args);
    else {
      const replies = await this.withWait((p) => p.tbMark(...args));
      [status, value] = replies.result as [number, number];
      if (status === 1) replies.check();
    }
    if (status === 1) return { kind: 'marked', tookOver: value === 1 };
    if (status === -1) return { kind: 'busy', until: value };
    return { kind: 'stale' };
  }

  /**
   * Runs one script and WAIT for the required replicas in one round trip on the script's
   * connection (in a Cluster, the pipeline goes to the node of the script's keys). `check()`
   * throws StateNotReplicatedError when fewer replicas acknowledged.
   */
  private async withWait(
    add: (pipeline: ScriptCommands) => unknown,
  ): Promise<{ result: unknown; check: () => void }> {
    const required = this.minReplicas;
    const pipeline = this.redis.pipeline() as unknown as ScriptCommands & {
      wait(replicas: number, timeout: number): unknown;
      exec(): Promise<[Error | null, unknown][] | null>;
    };
    add(pipeline);
    pipeline.wait(required, this.options.waitTimeoutMs);
    const replies = (await pipeline.exec()) ?? [];
    const [scriptErr, result] = replies[0] ?? [new Error('no reply to the script')];
    if (scriptErr) throw scriptErr;
    return {
      result,
      check: () => {
        const [waitErr, acknowledged] = replies[1] ?? [new Error('no reply to WAIT')];
        if (waitErr) throw waitErr;
        if (Number(acknowledged) < required)
          throw new StateNotReplicatedError(Number(acknowledged), required);
      },
    };
  }

  private async touchRaw(ref: SessionRef, now: number): Promise<void> {
    await this.redis.tbTouch(this.keys.session(ref), String(now));
  }

  private dueOf(ref: SessionRef): string {
    return this.keys.due(KeySpace.shardOf(KeySpace.sessionId(ref)));
  }

  private async scheduleRaw(ref: SessionRef, at: number): Promise<void> {
    await this.redis.zadd(this.dueOf(ref), at, KeySpace.sessionId(ref));
  }

  private async unscheduleRaw(ref: SessionRef): Promise<void> {
    await this.redis.zrem(this.dueOf(ref), KeySpace.sessionId(ref));
  }

  /** Where the next claim starts, so no shard is always served last. */
  private claimCursor = Math.floor(Math.random() * KeySpace.shards.length);

  /**
   * Claims from every shard: first counts what is due in each (one concurrent round), then claims
   * from the shards that have some, starting at a rotating shard, until `limit` is reached.
   */
  private async claimDueRaw(now: number, limit: number, leaseUntil: number): Promise<DueClaim[]> {
    const shards = KeySpace.shards;
    if (!this.cluster) {
      // One node holds every shard: one script, one round trip.
      const start = this.claimCursor++ % shards.length;
      const pairs = await this.redis.tbClaimShards(
        ...this.dueKeys,
        String(now),
        String(limit),
        String(leaseUntil),
        String(start),
      );
      return claimsOf(pairs);
    }
    // A shard whose master is failing over must not stop the others' rotations.
    const counted = await Promise.allSettled(
      shards.map((shard) => this.redis.zcount(this.keys.due(shard), '-inf', now)),
    );
    const failed = counted.find((c) => c.status === 'rejected');
    if (failed && counted.every((c) => c.status === 'rejected')) throw failed.reason;
    const start = this.claimCursor++ % shards.length;
    const claimed: DueClaim[] = [];
    for (let i = 0; i < shards.length && claimed.length < limit; i++) {
      const shard = (start + i) % shards.length;
      const count = counted[shard]!;
      if (count.status === 'rejected' || count.value === 0) continue;
      const pairs = await this.redis
        .tbClaim(
          this.keys.due(shard),
          String(now),
          String(limit - claimed.length),
          String(leaseUntil),
        )
        .catch((err: unknown) => {
          this.log.debug({ shard, err: String(err) }, 'claiming from a shard failed');
          return [] as string[];
        });
      claimed.push(...claimsOf(pairs));
    }
    return claimed;
  }

  /** Every shard's due key, in shard order. */
  private get dueKeys(): string[] {
    return KeySpace.shards.map((shard) => this.keys.due(shard));
  }

  private async sessionCountsRaw(): Promise<SessionCounts> {
    const shards = KeySpace.shards;
    const [active, reauth] = await Promise.all([
      Promise.all(shards.map((s) => this.redis.zcard(this.keys.due(s)))),
      Promise.all(shards.map((s) => this.redis.zcard(this.keys.reauth(s)))),
    ]);
    const sum = (values: number[]) => values.reduce((a, b) => a + b, 0);
    return { active: sum(active), reauthRequired: sum(reauth) };
  }

  private async familyEndCountsRaw(now: number, horizonsMs: readonly number[]): Promise<number[]> {
    const perShard = await Promise.all(
      KeySpace.shards.map((shard) =>
        Promise.all(
          horizonsMs.map((h) =>
            this.redis.zcount(this.keys.familyEnds(shard), '-inf', `(${now + h}`),
          ),
        ),
      ),
    );
    return horizonsMs.map((_, i) => perShard.reduce((sum, counts) => sum + counts[i]!, 0));
  }

  private async nextDueAtRaw(): Promise<number | undefined> {
    if (!this.cluster) {
      const min = await this.redis.tbNextDue(...this.dueKeys);
      return min === null ? undefined : Number(min);
    }
    const firsts = await Promise.allSettled(
      KeySpace.shards.map((s) => this.redis.zrange(this.keys.due(s), '0', '0', 'WITHSCORES')),
    );
    let min: number | undefined;
    for (const first of firsts) {
      // A shard that did not answer may have work due now: look again soon.
      const score = first.status === 'rejected' ? 0 : first.value[1];
      if (score !== undefined && (min === undefined || Number(score) < min)) min = Number(score);
    }
    return min;
  }

  /** Lexical order over all shards: each shard's next page, merged. */
  private async listRaw(tenant: string, after: string, limit: number): Promise<SessionPage> {
    const prefix = tenant ? `${encodeURIComponent(tenant)}:` : '';
    const min = after ? `(${after}` : `[${prefix}`;
    const max = prefix ? `[${prefix}\xff` : '+';
    const perShard = await Promise.all(
      KeySpace.shards.map((s) =>
        this.redis.zrangebylex(this.keys.index(s), min, max, 'LIMIT', 0, limit + 1),
      ),
    );
    const ids = perShard
      .flat()
      .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
      .slice(0, limit + 1);
    const page = ids.slice(0, limit);
    const rows = await Promise.all(
      page.map((id) =>
        this.redis.hmget(
          this.keys.session(KeySpace.parseSessionId(id)),
          'sealed',
          'used',
          'inflight',
        ),
      ),
    );
    const sessions: StoredSession[] = [];
    for (const [i, id] of page.entries()) {
      const [sealed, used, inflight] = rows[i]!;
      if (!sealed) continue;
      try {
        sessions.push(await this.open(KeySpace.parseSessionId(id), sealed, used, inflight));
      } catch (err) {
        // One unreadable record (logged and counted in open) must not hide everyone else's.
        if (!(err instanceof SealError)) throw err;
      }
    }
    return { sessions, next: ids.length > limit ? (page.at(-1) ?? '') : '' };
  }

  /**
   * Deletes up to `limit` sessions dead (REVOKED, REAUTH_REQUIRED, IDLE) since before `cutoff`,
   * shard after shard, with their due and index entries. Returns how many it deleted.
   */
  private async sweepDeadRaw(cutoff: number, limit: number): Promise<number> {
    let deleted = 0;
    for (const shard of KeySpace.shards) {
      if (deleted >= limit) break;
      const ids = await this.redis.zrangebyscore(
        this.keys.dead(shard),
        '-inf',
        cutoff,
        'LIMIT',
        0,
        limit - deleted,
      );
      if (ids.length === 0) continue;
      deleted += await this.redis.tbSweep(
        String(4 + ids.length),
        this.keys.dead(shard),
        this.keys.due(shard),
        this.keys.index(shard),
        this.keys.reauth(shard),
        ...ids.map((id) => this.keys.session(KeySpace.parseSessionId(id))),
        String(cutoff),
        ...ids,
      );
    }
    return deleted;
  }

  async subscribe(
    onEvent: (event: SessionEvent) => void,
    onResync: () => void,
    onDown: () => void = () => {},
  ): Promise<void> {
    const deliver = (_channel: string, message: string) => {
      try {
        onEvent(JSON.parse(message) as SessionEvent);
      } catch (err) {
        this.log.error({ err: String(err) }, 'malformed session event ignored');
      }
    };
    const channels = KeySpace.shards.map((s) => this.keys.events(s));
    if (this.redis instanceof Cluster && this.options.target.kind === 'cluster') {
      const sharded = new ShardedEventSubscriber(
        this.redis,
        nodeOptions(this.options.target),
        channels,
        deliver,
        onResync,
        this.log,
        onDown,
      );
      this.sharded = sharded;
      await sharded.start();
      return;
    }
    const subscriber = connect(this.options.target, 'subscriber');
    this.subscriber = subscriber;
    subscriber.on('error', (err: Error) => this.log.warn({ err: err.message }, 'events error'));
    let connectedOnce = false;
    subscriber.on('ready', () => {
      // After a reconnect, subscribe again (ioredis is told not to: connect()). Events published
      // meanwhile are lost, so re-read, but only once the subscription is in place again, or a
      // change between the read and it would be missed.
      if (connectedOnce)
        // One catch for both: a throwing onResync must not become an unhandled rejection.
        void subscriber
          .subscribe(...channels)
          .then(() => onResync())
          .catch((err: unknown) =>
            this.log.warn({ err: String(err) }, 'resubscribing to events failed'),
          );
      connectedOnce = true;
    });
    subscriber.on('message', deliver);
    // Events published from now until the 'ready' above resubscribes are lost.
    subscriber.on('close', onDown);
    await subscriber.subscribe(...channels);
  }

  async close(): Promise<void> {
    await this.sharded?.close();
    await this.subscriber?.quit().catch(() => this.subscriber?.disconnect());
    await this.redis.quit().catch(() => this.redis.disconnect());
  }
}

/** A script's flat pairs (id, due time, ...) as claims. */
function claimsOf(pairs: readonly string[]): DueClaim[] {
  const claimed: DueClaim[] = [];
  for (let j = 0; j + 1 < pairs.length; j += 2)
    claimed.push({ ref: KeySpace.parseSessionId(pairs[j]!), dueAt: Number(pairs[j + 1]) });
  return claimed;
}

/** What a commit publishes: which session moved to which generation. */
function eventOf(record: SessionRecord): SessionEvent {
  return {
    tenant: record.tenant,
    user: record.user,
    generation: record.generation,
    epoch: epochOf(record),
  };
}

function tlsOptions(tls: RedisTls | undefined): RedisOptions['tls'] {
  return tls ? (tls.ca === undefined ? {} : { ca: tls.ca }) : undefined;
}

const COMMON: RedisOptions = { maxRetriesPerRequest: 2, commandTimeout: COMMAND_TIMEOUT_MS };

/** Options of a connection to one cluster node. */
function nodeOptions(target: Extract<StateStoreConfig, { kind: 'cluster' }>): RedisOptions {
  return { ...COMMON, password: target.password, tls: tlsOptions(target.tls) };
}

/**
 * A client for the configured shape: the command client (auto-pipelined), or the events
 * subscriber, which resubscribes itself (subscribe()), so ioredis must not: its own resubscribe
 * after a reconnect is a promise no one holds, rejected as unhandled when the connection is closed
 * before the answer (a broker stopping during a failover).
 */
function connect(target: StateStoreConfig, use: 'commands' | 'subscriber'): Redis | Cluster {
  const pipelined = use === 'commands' && autoPipeliningAllowed();
  const common: RedisOptions = {
    ...COMMON,
    enableAutoPipelining: pipelined,
    autoResubscribe: use === 'commands',
  };
  switch (target.kind) {
    case 'single':
      return new Redis(target.url, common);
    case 'sentinel':
      return new Redis({
        ...common,
        sentinels: target.sentinels,
        name: target.master,
        password: target.password,
        sentinelPassword: target.sentinelPassword,
        tls: tlsOptions(target.tls),
        sentinelTLS: tlsOptions(target.tls),
        enableTLSForSentinelMode: target.tls !== undefined,
        // Learn of a failover from the sentinels at once instead of at the next failed command.
        failoverDetector: true,
        sentinelRetryStrategy: (times: number) => Math.min(100 * times, 1_000),
        retryStrategy: (times: number) => Math.min(50 * times, 500),
      });
    case 'cluster': {
      const options: ClusterOptions = {
        redisOptions: nodeOptions(target),
        enableAutoPipelining: pipelined,
        scaleReads: 'master',
        retryDelayOnFailover: 100,
        retryDelayOnClusterDown: 100,
        retryDelayOnTryAgain: 100,
        // Learn of a promoted replica soon even when no command was redirected yet.
        slotsRefreshInterval: 2_000,
        clusterRetryStrategy: (times: number) => Math.min(100 * times, 1_000),
      };
      return new Cluster(target.nodes, options);
    }
  }
}

/** Rethrows a Redis client failure as UnavailableError (the detail, for logs, says what it was). */
async function unavailableOnFailure<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (err) {
    if (err instanceof BrokerError || !(err instanceof Error)) throw err;
    throw new UnavailableError('the state store is unavailable', undefined, {
      detail: err.message.slice(0, 200),
      cause: err,
    });
  }
}
