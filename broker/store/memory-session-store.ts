import type { Transition } from '../session-transitions.js';
import { KeySpace } from './keys.js';
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

/**
 * A copy no caller can change the store through: every field of a record is a primitive but the
 * login, so copying the record, its login and the marker is a deep copy. Shallow copies share the
 * (immutable) strings instead of duplicating them as structuredClone did, which costs memory per
 * session and time per read.
 */
function copyRecord(record: SessionRecord): SessionRecord {
  return record.login ? { ...record, login: { ...record.login } } : { ...record };
}

function copyStored(stored: StoredSession): StoredSession {
  return {
    record: copyRecord(stored.record),
    lastUsedAt: stored.lastUsedAt,
    inflight: stored.inflight && { ...stored.inflight },
  };
}

/** Distinct values kept by `Interned`: tenants, IdP names, token types, enrolling callers. */
const INTERNED_MAX = 10_000;

/**
 * One string for each of the few values many sessions repeat (each gRPC call decodes its own
 * copy of the tenant, and the enrolling caller's name is built per call). Past INTERNED_MAX
 * distinct values it stops taking new ones, so it never grows with the sessions.
 */
class Interned {
  private readonly values = new Map<string, string>();

  of(value: string): string;
  of(value: string | undefined): string | undefined;
  of(value: string | undefined): string | undefined {
    if (value === undefined) return undefined;
    const known = this.values.get(value);
    if (known !== undefined) return known;
    if (this.values.size < INTERNED_MAX) this.values.set(value, value);
    return value;
  }
}

/** Embedded mode: state in this process only. Not for production (one replica, lost on exit). */
export class MemorySessionStore implements SessionStore {
  private readonly sessions = new Map<string, StoredSession>();
  private readonly interned = new Interned();
  private readonly due = new Map<string, number>();
  /** Since when each REVOKED, REAUTH_REQUIRED or IDLE session has been so (retention). */
  private readonly deadSince = new Map<string, number>();
  private readonly listeners: ((event: SessionEvent) => void)[] = [];

  get(ref: SessionRef): Promise<StoredSession | undefined> {
    const stored = this.sessions.get(KeySpace.sessionId(ref));
    return Promise.resolve(stored && copyStored(stored));
  }

  commit(transition: Transition, expectedGeneration: number | null, now: number): Promise<boolean> {
    const record = transition.next;
    const id = KeySpace.sessionId(record);
    const current = this.sessions.get(id);
    if (expectedGeneration === null ? current : current?.record.generation !== expectedGeneration)
      return Promise.resolve(false);
    this.sessions.set(id, {
      record: this.keep(record),
      lastUsedAt: current?.lastUsedAt ?? now,
      inflight: undefined,
    });
    if (transition.dueAt === undefined) this.due.delete(id);
    else this.due.set(id, transition.dueAt);
    if (!DEAD_STATUSES.has(record.status)) this.deadSince.delete(id);
    else if (!this.deadSince.has(id)) this.deadSince.set(id, now);
    if (current?.record.generation !== record.generation) {
      const event: SessionEvent = {
        tenant: record.tenant,
        user: record.user,
        generation: record.generation,
        epoch: epochOf(record),
      };
      // Delivered after the write returns, as a Redis subscriber would see it.
      queueMicrotask(() => this.listeners.forEach((listener) => listener(event)));
    }
    return Promise.resolve(true);
  }

  /** The copy the store keeps of a committed record, repeated values interned. */
  private keep(record: SessionRecord): SessionRecord {
    const kept: SessionRecord = {
      ...copyRecord(record),
      tenant: this.interned.of(record.tenant),
      idp: this.interned.of(record.idp),
      tokenType: this.interned.of(record.tokenType),
    };
    if (record.enrolledBy !== undefined) kept.enrolledBy = this.interned.of(record.enrolledBy);
    return kept;
  }

  markInflight(
    ref: SessionRef,
    marker: InflightMarker,
    now: number,
    requeueAt?: number,
  ): Promise<MarkResult> {
    const stored = this.sessions.get(KeySpace.sessionId(ref));
    if (!stored || stored.record.generation !== marker.generation)
      return Promise.resolve({ kind: 'stale' });
    const earlier = stored.inflight;
    if (earlier && earlier.generation === marker.generation && earlier.deadline > now)
      return Promise.resolve({ kind: 'busy', until: earlier.deadline });
    stored.inflight = { ...marker };
    if (requeueAt !== undefined) this.due.set(KeySpace.sessionId(ref), requeueAt);
    return Promise.resolve({
      kind: 'marked',
      tookOver: earlier?.generation === marker.generation,
    });
  }

  touch(ref: SessionRef, now: number): Promise<void> {
    const stored = this.sessions.get(KeySpace.sessionId(ref));
    if (stored) stored.lastUsedAt = Math.max(stored.lastUsedAt, now);
    return Promise.resolve();
  }

  schedule(ref: SessionRef, at: number): Promise<void> {
    this.due.set(KeySpace.sessionId(ref), at);
    return Promise.resolve();
  }

  unschedule(ref: SessionRef): Promise<void> {
    this.due.delete(KeySpace.sessionId(ref));
    return Promise.resolve();
  }

  claimDue(now: number, limit: number, leaseUntil: number): Promise<DueClaim[]> {
    const claimed: DueClaim[] = [];
    const ordered = [...this.due.entries()].sort((a, b) => a[1] - b[1]);
    for (const [id, at] of ordered) {
      if (at > now || claimed.length >= limit) break;
      this.due.set(id, leaseUntil);
      claimed.push({ ref: KeySpace.parseSessionId(id), dueAt: at });
    }
    return Promise.resolve(claimed);
  }

  sessionCounts(): Promise<SessionCounts> {
    let reauthRequired = 0;
    for (const { record } of this.sessions.values())
      if (record.status === 'REAUTH_REQUIRED') reauthRequired += 1;
    return Promise.resolve({ active: this.due.size, reauthRequired });
  }

  familyEndCounts(now: number, horizonsMs: readonly number[]): Promise<number[]> {
    const ends: number[] = [];
    for (const { record } of this.sessions.values()) {
      const end = familyEndOf(record);
      if (end !== undefined) ends.push(end);
    }
    return Promise.resolve(horizonsMs.map((h) => ends.filter((end) => end < now + h).length));
  }

  nextDueAt(): Promise<number | undefined> {
    let min: number | undefined;
    for (const at of this.due.values()) if (min === undefined || at < min) min = at;
    return Promise.resolve(min);
  }

  list(tenant: string, after: string, limit: number): Promise<SessionPage> {
    const prefix = tenant ? `${encodeURIComponent(tenant)}:` : '';
    const ids = [...this.sessions.keys()]
      .filter((id) => id.startsWith(prefix) && id > after)
      .sort()
      .slice(0, limit + 1);
    const page = ids.slice(0, limit);
    return Promise.resolve({
      sessions: page.map((id) => copyStored(this.sessions.get(id)!)),
      next: ids.length > limit ? (page.at(-1) ?? '') : '',
    });
  }

  sweepDead(cutoff: number, limit: number): Promise<number> {
    let deleted = 0;
    for (const [id, since] of this.deadSince) {
      if (deleted >= limit) break;
      if (since > cutoff) continue;
      this.sessions.delete(id);
      this.due.delete(id);
      this.deadSince.delete(id);
      deleted += 1;
    }
    return Promise.resolve(deleted);
  }

  subscribe(onEvent: (event: SessionEvent) => void): Promise<void> {
    this.listeners.push(onEvent);
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.listeners.length = 0;
    return Promise.resolve();
  }
}
