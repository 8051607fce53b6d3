import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { SealError } from '../errors.js';
import type { Sealer } from '../sealing.js';
import { KeySpace } from './keys.js';
import type { Transition } from '../session-transitions.js';
import { epochOf } from './session-record.js';
import { CLAIM_DUE, COMMIT_SESSION, MARK_INFLIGHT, TOUCH_SESSION } from './redis-scripts.js';
import type {
  InflightMarker,
  SessionEvent,
  SessionRecord,
  SessionRef,
  StoredSession,
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
  tbMark(key: string, ...args: string[]): Promise<[number, number]>;
  tbTouch(key: string, now: string): Promise<number>;
  /** Flat pairs: id, due time, id, due time, ... */
  tbClaim(key: string, now: string, limit: string, leaseUntil: string): Promise<string[]>;
}

/** Session state in Redis, records sealed with JWE; see keys.ts and redis-scripts.ts. */
export class RedisSessionStore implements SessionStore {
  private readonly redis: Redis & ScriptCommands;
  private subscriber: Redis | undefined;
  private readonly keys: KeySpace;

  constructor(
    url: string,
    prefix: string,
    private readonly sealer: Sealer,
    private readonly log: Logger,
    /** Told of each record that could not be opened (the broker counts them in a metric). */
    private readonly onUnreadable: (code: SealError['code']) => void = () => {},
  ) {
    this.keys = new KeySpace(prefix);
    const redis = new Redis(url, { maxRetriesPerRequest: 2, commandTimeout: 5_000 });
    redis.on('error', (err: Error) => log.warn({ err: err.message }, 'state store error'));
    redis.defineCommand('tbCommit', { numberOfKeys: 5, lua: COMMIT_SESSION });
    redis.defineCommand('tbMark', { numberOfKeys: 1, lua: MARK_INFLIGHT });
    redis.defineCommand('tbTouch', { numberOfKeys: 1, lua: TOUCH_SESSION });
    redis.defineCommand('tbClaim', { numberOfKeys: 1, lua: CLAIM_DUE });
    this.redis = redis as Redis & ScriptCommands;
  }

  /**
   * Resolves once Redis answers a PING; rejects with the last error after `timeoutMs`. Start-up
   * uses it so an unreachable or misconfigured TB_REDIS_URL fails at once, naming the variable.
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

  async get(ref: SessionRef): Promise<StoredSession | undefined> {
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

  async commit(
    transition: Transition,
    expectedGeneration: number | null,
    now: number,
  ): Promise<boolean> {
    const record: SessionRecord = transition.next;
    const id = KeySpace.sessionId(record);
    const sealed = await this.sealer.seal(record, id);
    const event: SessionEvent = {
      tenant: record.tenant,
      user: record.user,
      generation: record.generation,
      epoch: epochOf(record),
    };
    const committed = await this.redis.tbCommit(
      this.keys.session(record),
      this.keys.due,
      this.keys.index,
      this.keys.reauth,
      this.keys.familyEnds,
      expectedGeneration === null ? '' : String(expectedGeneration),
      String(record.generation),
      sealed,
      String(now),
      this.keys.events,
      JSON.stringify(event),
      id,
      transition.dueAt === undefined ? '' : String(transition.dueAt),
      record.status === 'REAUTH_REQUIRED' ? '1' : '0',
      String(familyEndOf(record) ?? ''),
    );
    return committed === 1;
  }

  async markInflight(ref: SessionRef, marker: InflightMarker, now: number): Promise<MarkResult> {
    const [status, value] = await this.redis.tbMark(
      this.keys.session(ref),
      String(marker.generation),
      JSON.stringify(marker),
      String(now),
    );
    if (status === 1) return { kind: 'marked', tookOver: value === 1 };
    if (status === -1) return { kind: 'busy', until: value };
    return { kind: 'stale' };
  }

  async touch(ref: SessionRef, now: number): Promise<void> {
    await this.redis.tbTouch(this.keys.session(ref), String(now));
  }

  async schedule(ref: SessionRef, at: number): Promise<void> {
    await this.redis.zadd(this.keys.due, at, KeySpace.sessionId(ref));
  }

  async unschedule(ref: SessionRef): Promise<void> {
    await this.redis.zrem(this.keys.due, KeySpace.sessionId(ref));
  }

  async claimDue(now: number, limit: number, leaseUntil: number): Promise<DueClaim[]> {
    const pairs = await this.redis.tbClaim(
      this.keys.due,
      String(now),
      String(limit),
      String(leaseUntil),
    );
    const claimed: DueClaim[] = [];
    for (let i = 0; i + 1 < pairs.length; i += 2)
      claimed.push({ ref: KeySpace.parseSessionId(pairs[i]!), dueAt: Number(pairs[i + 1]) });
    return claimed;
  }

  async sessionCounts(): Promise<SessionCounts> {
    const [active, reauthRequired] = await Promise.all([
      this.redis.zcard(this.keys.due),
      this.redis.zcard(this.keys.reauth),
    ]);
    return { active, reauthRequired };
  }

  async familyEndCounts(now: number, horizonsMs: readonly number[]): Promise<number[]> {
    return Promise.all(
      horizonsMs.map((h) => this.redis.zcount(this.keys.familyEnds, '-inf', `(${now + h}`)),
    );
  }

  async nextDueAt(): Promise<number | undefined> {
    const first = await this.redis.zrange(this.keys.due, '0', '0', 'WITHSCORES');
    return first[1] === undefined ? undefined : Number(first[1]);
  }

  async list(tenant: string, after: string, limit: number): Promise<SessionPage> {
    const prefix = tenant ? `${encodeURIComponent(tenant)}:` : '';
    const min = after ? `(${after}` : `[${prefix}`;
    const max = prefix ? `[${prefix}\xff` : '+';
    const ids = await this.redis.zrangebylex(this.keys.index, min, max, 'LIMIT', 0, limit + 1);
    const page = ids.slice(0, limit);
    const pipeline = this.redis.pipeline();
    for (const id of page)
      pipeline.hmget(this.keys.session(KeySpace.parseSessionId(id)), 'sealed', 'used', 'inflight');
    const rows = (await pipeline.exec()) ?? [];
    const sessions: StoredSession[] = [];
    for (const [i, id] of page.entries()) {
      const [err, fields] = rows[i] ?? [];
      if (err) throw err;
      const [sealed, used, inflight] = fields as (string | null)[];
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

  async subscribe(onEvent: (event: SessionEvent) => void, onResync: () => void): Promise<void> {
    const subscriber = this.redis.duplicate();
    this.subscriber = subscriber;
    subscriber.on('error', (err: Error) => this.log.warn({ err: err.message }, 'events error'));
    let connectedOnce = false;
    subscriber.on('ready', () => {
      // ioredis resubscribes on reconnect; events published meanwhile are lost, so re-read.
      if (connectedOnce) onResync();
      connectedOnce = true;
    });
    subscriber.on('message', (_channel: string, message: string) => {
      try {
        onEvent(JSON.parse(message) as SessionEvent);
      } catch (err) {
        this.log.error({ err: String(err) }, 'malformed session event ignored');
      }
    });
    await subscriber.subscribe(this.keys.events);
  }

  async close(): Promise<void> {
    await this.subscriber?.quit().catch(() => this.subscriber?.disconnect());
    await this.redis.quit().catch(() => this.redis.disconnect());
  }
}
