import type { Transition } from './session-transitions.js';
import { KeySpace } from './store/keys.js';
import {
  epochOf,
  type SessionEvent,
  type SessionRecord,
  type SessionRef,
} from './store/session-record.js';
import type { SessionStore } from './store/session-store.js';

export interface SessionCacheOptions {
  /** The most records held; the least recently read is dropped beyond it. */
  maxEntries: number;
  /**
   * The longest an entry is served without a read of the store, whatever the events say: a
   * backstop for an event stream that stops without its connection closing (a frozen node).
   */
  maxAgeMs: number;
}

/**
 * The defaults: 10,000 records cover every user a replica's direct readers read in a busy cluster
 * (sidecars read through Watch, not GetToken); an entry holds no refresh token, so it is about
 * the access token's size (1-4 KiB for a JWT with many roles): 10-40 MiB at most.
 */
export const SESSION_CACHE_DEFAULTS: SessionCacheOptions = { maxEntries: 10_000, maxAgeMs: 2_000 };

/** A read of the store in progress, started with begin(); stale once an event may have passed it. */
export interface CacheLoad {
  readonly id: string;
  stale: boolean;
}

interface Entry {
  record: SessionRecord;
  loadedAt: number;
}

/**
 * GetToken's in-memory copy of opened ACTIVE records, kept current by the store's events: never
 * staler than the last event this replica received. An event for a session drops its entry unless
 * the entry already holds that generation of that epoch, and marks every read of it still in
 * flight stale (its result is not kept: it may predate the event). While the event stream is down
 * (`down()` until `up()`) nothing is kept or served: events may be missed. Entries hold no refresh
 * token and no login. Bounded: least recently read first out beyond `maxEntries`, and each entry
 * at most `maxAgeMs` old.
 */
export class SessionCache {
  private readonly entries = new Map<string, Entry>();
  private readonly loads = new Map<string, Set<CacheLoad>>();
  private live: boolean;

  constructor(
    private readonly options: SessionCacheOptions = SESSION_CACHE_DEFAULTS,
    private readonly clock: () => number = Date.now,
    /** Whether the event stream is up at start (a store that never goes down: true). */
    live = true,
  ) {
    this.live = live;
  }

  get size(): number {
    return this.entries.size;
  }

  /** Whether the event stream is up, so entries may be served. */
  get serving(): boolean {
    return this.live;
  }

  /** The cached record of `ref`, or undefined (then read the store inside begin()/end()). */
  get(ref: SessionRef): SessionRecord | undefined {
    if (!this.live) return undefined;
    const id = KeySpace.sessionId(ref);
    const entry = this.entries.get(id);
    if (!entry) return undefined;
    if (this.clock() - entry.loadedAt > this.options.maxAgeMs) {
      this.entries.delete(id);
      return undefined;
    }
    // Most recently read last, so eviction takes the least recently read.
    this.entries.delete(id);
    this.entries.set(id, entry);
    return entry.record;
  }

  /** Call before reading the store for `ref`; hand the result to end(). */
  begin(ref: SessionRef): CacheLoad {
    const load: CacheLoad = { id: KeySpace.sessionId(ref), stale: !this.live };
    let set = this.loads.get(load.id);
    if (!set) this.loads.set(load.id, (set = new Set()));
    set.add(load);
    return load;
  }

  /**
   * Ends a read: keeps `record` if no event for the session and no outage came since begin(),
   * and it is worth keeping (ACTIVE with an access token). Always call it, also on failure.
   */
  end(load: CacheLoad, record: SessionRecord | undefined): void {
    const set = this.loads.get(load.id);
    set?.delete(load);
    if (set?.size === 0) this.loads.delete(load.id);
    if (load.stale || !this.live || !record || !cacheable(record)) return;
    if (this.entries.size >= this.options.maxEntries && !this.entries.has(load.id)) {
      const oldest = this.entries.keys().next();
      if (!oldest.done) this.entries.delete(oldest.value);
    }
    this.entries.delete(load.id);
    this.entries.set(load.id, { record: withoutSecrets(record), loadedAt: this.clock() });
  }

  /** A published change of a session (from any replica). */
  onEvent(event: SessionEvent): void {
    const id = KeySpace.sessionId(event);
    const loads = this.loads.get(id);
    if (loads) for (const load of loads) load.stale = true;
    const entry = this.entries.get(id);
    if (
      entry &&
      !(
        entry.record.generation === event.generation &&
        epochOf(entry.record) === (event.epoch ?? '')
      )
    )
      this.entries.delete(id);
  }

  /** This replica is about to change (and has changed) the session: forget it, as an event would. */
  invalidate(ref: SessionRef): void {
    const id = KeySpace.sessionId(ref);
    const loads = this.loads.get(id);
    if (loads) for (const load of loads) load.stale = true;
    this.entries.delete(id);
  }

  /** The event stream is down: events may be missed from now on, so forget everything. */
  down(): void {
    this.live = false;
    this.entries.clear();
    for (const set of this.loads.values()) for (const load of set) load.stale = true;
  }

  /** The event stream is back (subscribed again): serve again, from fresh reads only. */
  up(): void {
    this.entries.clear();
    for (const set of this.loads.values()) for (const load of set) load.stale = true;
    this.live = true;
  }
}

function cacheable(record: SessionRecord): boolean {
  return record.status === 'ACTIVE' && record.accessToken !== '';
}

function withoutSecrets(record: SessionRecord): SessionRecord {
  return { ...record, refreshToken: '', login: undefined };
}

/**
 * The store as the rotator and the session service see it when GetToken reads from a cache: every
 * commit of this replica forgets the session's entry before it is sent and again once it is
 * stored, so a caller served the new generation here (Refresh, Enroll) never reads an older one
 * from this replica afterwards, even before the store's event arrives. Everything else passes on.
 */
export class CacheInvalidatingStore implements SessionStore {
  constructor(
    private readonly store: SessionStore,
    private readonly cache: SessionCache,
  ) {}

  async commit(transition: Transition, expectedGeneration: number | null, now: number) {
    this.cache.invalidate(transition.next);
    try {
      return await this.store.commit(transition, expectedGeneration, now);
    } finally {
      this.cache.invalidate(transition.next);
    }
  }

  get(ref: SessionRef) {
    return this.store.get(ref);
  }
  // Every parameter passed on (a dropped optional one compiles: spell them all out).
  markInflight(...args: Parameters<SessionStore['markInflight']>) {
    return this.store.markInflight(...args);
  }
  touch(ref: SessionRef, now: number) {
    return this.store.touch(ref, now);
  }
  schedule(ref: SessionRef, at: number) {
    return this.store.schedule(ref, at);
  }
  unschedule(ref: SessionRef) {
    return this.store.unschedule(ref);
  }
  claimDue(now: number, limit: number, leaseUntil: number) {
    return this.store.claimDue(now, limit, leaseUntil);
  }
  nextDueAt() {
    return this.store.nextDueAt();
  }
  list(tenant: string, after: string, limit: number) {
    return this.store.list(tenant, after, limit);
  }
  sessionCounts() {
    return this.store.sessionCounts();
  }
  familyEndCounts(now: number, horizonsMs: readonly number[]) {
    return this.store.familyEndCounts(now, horizonsMs);
  }
  sweepDead(cutoff: number, limit: number) {
    return this.store.sweepDead(cutoff, limit);
  }
  subscribe(onEvent: (event: SessionEvent) => void, onResync: () => void, onDown?: () => void) {
    return this.store.subscribe(onEvent, onResync, onDown);
  }
  close() {
    return this.store.close();
  }
}
