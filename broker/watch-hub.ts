import type { Logger } from 'pino';
import { UnavailableError } from './errors.js';
import { KeySpace } from './store/keys.js';
import {
  epochOf,
  type SessionEvent,
  type SessionRecord,
  type SessionRef,
} from './store/session-record.js';
import type { SessionStore } from './store/session-store.js';

/** What the hub reads: one session's current state. */
export type WatchHubStore = Pick<SessionStore, 'get'>;

/**
 * One fan-out of a record to every sink that needs it. What a sink derives from the record (a
 * Watch stream: the encoded message) it derives through `once`, so the work is done once per
 * fan-out, not once per sink; each fan-out has its own, so nothing derived outlives it.
 */
export class Delivery {
  private readonly derived = new Map<symbol, unknown>();

  constructor(readonly record: SessionRecord) {}

  /** `derive(record)`, computed on the first call with `key` and shared by the later ones. */
  once<T>(key: symbol, derive: (record: SessionRecord) => T): T {
    if (this.derived.has(key)) return this.derived.get(key) as T;
    const value = derive(this.record);
    this.derived.set(key, value);
    return value;
  }
}

/** One watcher of sessions (a Watch stream). It keeps only the newest pending state. */
export interface WatchSink {
  /** `delivery` is shared by every sink of this fan-out (see Delivery.once). */
  deliver(record: SessionRecord, delivery: Delivery): void;
}

/** A point in a session's history: a generation within an epoch. */
export interface Position {
  epoch: string;
  generation: number;
}

/**
 * Whether `record` is news to a watcher at `held`: a newer generation of the same epoch, or any
 * generation of another epoch (an enrollment again; generations may have restarted at 1). When
 * either epoch is unknown ('': a record written before epochs, or a watcher that names none, as
 * clients that predate epochs) the generation alone decides, as it always did.
 */
export function isNewer(record: SessionRecord, held: Position): boolean {
  const epoch = epochOf(record);
  if (epoch !== '' && held.epoch !== '' && epoch !== held.epoch) return true;
  return record.generation > held.generation;
}

interface Watched {
  ref: SessionRef;
  /** Each sink with the newest position it was sent. */
  sinks: Map<WatchSink, Position>;
  waiters: Set<{ above: number; resolve: (record: SessionRecord | undefined) => void }>;
  loading: Promise<void> | undefined;
  dirty: boolean;
  /** Generation of the newest record read (-1: none yet), and its epoch. */
  newest: number;
  newestEpoch: string;
  /** The last read failed (store unreachable), so "not found" cannot be told apart. */
  failed: boolean;
}

/**
 * This replica's watchers, by session. Events from any replica name a session and generation;
 * the hub re-reads the record once per event burst and hands each sink only generations newer
 * than it already has, so every sink sees a session's generations in increasing order.
 */
export class WatchHub {
  private readonly watched = new Map<string, Watched>();

  constructor(
    private readonly store: WatchHubStore,
    private readonly log: Logger,
  ) {}

  /**
   * Starts delivery of `ref` to `sink`: the current state now (if newer than `afterGeneration`
   * of `epoch`, or of another epoch), then each newer one. Returns false when the session does
   * not exist yet; the subscription stays, and the first state arrives when it is enrolled.
   */
  async subscribe(
    ref: SessionRef,
    sink: WatchSink,
    afterGeneration: number,
    epoch = '',
  ): Promise<boolean> {
    const entry = this.entry(ref);
    if (!entry.sinks.has(sink)) entry.sinks.set(sink, { epoch, generation: afterGeneration });
    await this.reload(entry);
    if (entry.newest < 0 && entry.failed)
      throw new UnavailableError('the session state cannot be read now; subscribe again shortly');
    return entry.newest >= 0;
  }

  unsubscribe(ref: SessionRef, sink: WatchSink): void {
    const id = KeySpace.sessionId(ref);
    const entry = this.watched.get(id);
    if (!entry) return;
    entry.sinks.delete(sink);
    this.dropIfUnused(id, entry);
  }

  /** Removes `sink` from every session (its stream ended). */
  detach(sink: WatchSink): void {
    for (const [id, entry] of this.watched) {
      entry.sinks.delete(sink);
      this.dropIfUnused(id, entry);
    }
  }

  /** Resolves with the session once its generation exceeds `above`, or undefined on timeout. */
  waitForGeneration(
    ref: SessionRef,
    above: number,
    timeoutMs: number,
  ): Promise<SessionRecord | undefined> {
    const id = KeySpace.sessionId(ref);
    const entry = this.entry(ref);
    return new Promise((resolve) => {
      const waiter = {
        above,
        resolve: (record: SessionRecord | undefined) => {
          clearTimeout(timer);
          entry.waiters.delete(waiter);
          this.dropIfUnused(id, entry);
          resolve(record);
        },
      };
      const timer = setTimeout(() => waiter.resolve(undefined), timeoutMs);
      entry.waiters.add(waiter);
      // The generation may have moved before we started waiting.
      void this.reload(entry);
    });
  }

  onEvent(event: SessionEvent): void {
    const entry = this.watched.get(KeySpace.sessionId(event));
    if (!entry) return;
    // Another epoch's generation may be lower than the one held (enrolled again): news too. An
    // event without one (or an empty one: a record from before epochs) names no other epoch.
    const otherEpoch =
      event.epoch !== undefined && event.epoch !== '' && event.epoch !== entry.newestEpoch;
    if (otherEpoch || event.generation > entry.newest) void this.reload(entry);
  }

  /** Events may have been lost: re-read every watched session. */
  resync(): void {
    for (const entry of this.watched.values()) void this.reload(entry);
  }

  /** Sessions that have at least one watcher here (their lease is kept by this replica). */
  watchedRefs(): SessionRef[] {
    return [...this.watched.values()].filter((e) => e.sinks.size > 0).map((e) => e.ref);
  }

  get watcherCount(): number {
    let count = 0;
    for (const entry of this.watched.values()) count += entry.sinks.size;
    return count;
  }

  private entry(ref: SessionRef): Watched {
    const id = KeySpace.sessionId(ref);
    let entry = this.watched.get(id);
    if (!entry) {
      entry = {
        ref: { tenant: ref.tenant, user: ref.user },
        sinks: new Map(),
        waiters: new Set(),
        loading: undefined,
        dirty: false,
        newest: -1,
        newestEpoch: '',
        failed: false,
      };
      this.watched.set(id, entry);
    }
    return entry;
  }

  private dropIfUnused(id: string, entry: Watched): void {
    if (entry.sinks.size === 0 && entry.waiters.size === 0) this.watched.delete(id);
  }

  /** One read in flight per session; events arriving meanwhile cause one more read after it. */
  private reload(entry: Watched): Promise<void> {
    if (entry.loading) {
      entry.dirty = true;
      return entry.loading;
    }
    entry.loading = (async () => {
      do {
        entry.dirty = false;
        try {
          const stored = await this.store.get(entry.ref);
          entry.failed = false;
          if (stored) this.fanOut(entry, stored.record);
        } catch (err) {
          entry.failed = true;
          this.log.warn({ tenant: entry.ref.tenant, err: String(err) }, 'watch reload failed');
        }
      } while (entry.dirty);
      entry.loading = undefined;
    })();
    return entry.loading;
  }

  private fanOut(entry: Watched, record: SessionRecord): void {
    const epoch = epochOf(record);
    if (epoch !== entry.newestEpoch) {
      entry.newestEpoch = epoch;
      entry.newest = record.generation;
    } else entry.newest = Math.max(entry.newest, record.generation);
    let delivery: Delivery | undefined;
    for (const [sink, sent] of entry.sinks) {
      if (!isNewer(record, sent)) continue;
      // Each sink's position is its own object (subscribe makes it): updated in place.
      sent.epoch = epoch || sent.epoch;
      sent.generation = record.generation;
      sink.deliver(record, (delivery ??= new Delivery(record)));
    }
    for (const waiter of entry.waiters)
      if (record.generation > waiter.above) waiter.resolve(record);
  }
}
