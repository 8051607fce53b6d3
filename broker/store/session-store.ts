import type { Transition } from '../session-transitions.js';
import type {
  InflightMarker,
  SessionEvent,
  SessionRecord,
  SessionRef,
  StoredSession,
} from './session-record.js';

/** Result of marking a presentation in flight. */
export type MarkResult =
  /** Marked; `tookOver` is true when an earlier attempt's outcome is unknown (it crashed). */
  | { kind: 'marked'; tookOver: boolean }
  /** The generation moved on: someone else rotated. */
  | { kind: 'stale' }
  /** Another attempt may still be in flight until `until`: do not present now. */
  | { kind: 'busy'; until: number };

/** A claimed due-queue entry: the session and when it was due (its score at the claim). */
export interface DueClaim {
  ref: SessionRef;
  dueAt: number;
}

/**
 * When a session's token family ends for good, for the family-end gauge: only for an ACTIVE
 * session with no login to fall back on (a login session logs in again ahead of it) whose refresh
 * token has a known end; undefined otherwise.
 */
export function familyEndOf(record: SessionRecord): number | undefined {
  if (record.status !== 'ACTIVE' || record.login !== undefined) return undefined;
  return record.refreshExpiresAt > 0 ? record.refreshExpiresAt : undefined;
}

/** Cluster-wide session counts for the gauges. */
export interface SessionCounts {
  /** Sessions in the due queue: the ones being kept fresh. */
  active: number;
  reauthRequired: number;
}

export interface SessionPage {
  sessions: StoredSession[];
  /** Continue after this id; empty when the listing is complete. */
  next: string;
}

/**
 * Durable session state. Every multi-field change is atomic; writes are compare-and-set on the
 * session's generation and publish a SessionEvent when the generation changes, once the write is
 * stored (in Redis: acknowledged by TB_REDIS_MIN_REPLICAS replicas), never before.
 */
export interface SessionStore {
  get(ref: SessionRef): Promise<StoredSession | undefined>;
  /**
   * Commits a transition in one atomic step, if the stored generation equals
   * `expectedGeneration` (null: the session must not exist): writes the record, clears any
   * in-flight marker, puts the session in the due queue at `dueAt` (or takes it out), and
   * publishes when the generation changed. Returns false on a compare-and-set miss (then nothing
   * changed).
   */
  commit(transition: Transition, expectedGeneration: number | null, now: number): Promise<boolean>;
  /**
   * Marks a presentation in flight (compare-and-set on the marker's generation). When marked and
   * `requeueAt` is given, the session's due-queue entry moves to it in the same step.
   */
  markInflight(
    ref: SessionRef,
    marker: InflightMarker,
    now: number,
    requeueAt?: number,
  ): Promise<MarkResult>;
  /** Records a read or watch, which keeps the session's lease. */
  touch(ref: SessionRef, now: number): Promise<void>;
  /** Moves the session's due-queue entry to `at` without changing it (retry later). */
  schedule(ref: SessionRef, at: number): Promise<void>;
  unschedule(ref: SessionRef): Promise<void>;
  /**
   * Atomically takes up to `limit` sessions due by `now`, hiding them until `leaseUntil`, so a
   * crashed claimer's work comes back. Each comes with the time it was due (for the lag metric).
   */
  claimDue(now: number, limit: number, leaseUntil: number): Promise<DueClaim[]>;
  /** The earliest due time in the queue, or undefined when it is empty. */
  nextDueAt(): Promise<number | undefined>;
  list(tenant: string, after: string, limit: number): Promise<SessionPage>;
  /** How many sessions are active and how many need re-authentication (cheap: two counters). */
  sessionCounts(): Promise<SessionCounts>;
  /**
   * For each horizon (ms), how many sessions' families end (familyEndOf) before `now + horizon`,
   * ended ones included (one cheap count per horizon and shard).
   */
  familyEndCounts(now: number, horizonsMs: readonly number[]): Promise<number[]>;
  /**
   * Deletes up to `limit` sessions that have been REVOKED, REAUTH_REQUIRED or IDLE since before
   * `cutoff` (epoch ms), with their due-queue and index entries; returns how many. Idempotent, so
   * replicas may sweep at once.
   */
  sweepDead(cutoff: number, limit: number): Promise<number>;
  /**
   * Calls `onEvent` for every published change from any replica. `onResync` is called when
   * events may have been missed (the subscription reconnected): re-read what you watch.
   * `onDown` is called as soon as events may start being missed (an events connection closed),
   * before the `onResync` that follows once subscribed again; a store whose events cannot be
   * missed (in memory) never calls it.
   */
  subscribe(
    onEvent: (event: SessionEvent) => void,
    onResync: () => void,
    onDown?: () => void,
  ): Promise<void>;
  close(): Promise<void>;
}
