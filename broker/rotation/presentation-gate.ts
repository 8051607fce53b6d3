import type { StoredSession } from '../store/session-record.js';

/** Why a rotation is asked for. */
export type RotationDemand =
  /** The due queue says so: rotate if the session is still due. */
  | { kind: 'due' }
  /** A caller holds `generation` and needs a newer one: rotate only if it is still current. */
  | { kind: 'generation'; generation: number };

export interface GateOptions {
  /** The longest an IdP call may take; it is aborted then. */
  idpTimeoutMs: number;
  /** Kept between the IdP deadline and the lock's end. */
  lockMarginMs: number;
  /** A session unread and unwatched this long stops being refreshed. */
  idleTimeoutMs: number;
  /** Delay before trying again when the lock is too short. */
  busyRetryMs: number;
}

/** The gate's answer: what this attempt does, before anything is claimed or presented. */
export type GateDecision =
  /** Revoked, idle or REAUTH_REQUIRED: nothing to rotate, leave the due queue. */
  | { kind: 'inactive' }
  /** The generation the caller held already moved on. */
  | { kind: 'stale' }
  /** Due, but no reader or watcher used the session for the idle timeout. */
  | { kind: 'idle' }
  /** Not due yet (a stale queue entry): put it back at its due time. */
  | { kind: 'not-due'; dueAt: number }
  /** The lock would not outlast the call: try again shortly, present nothing. */
  | { kind: 'lock-too-short'; retryAt: number }
  /** Present, with the call aborted by `deadline` at the latest. */
  | { kind: 'present'; deadline: number };

/**
 * May this attempt present the session's refresh token? Pure: it sees the state re-read under the
 * lock, the lock's remaining validity and `now`, and decides. (Steps 3 and 4 of the rotation in
 * ARCHITECTURE.md: stop if another replica already rotated; call the IdP only if the call can
 * finish, or be aborted, well before the lock could lapse.)
 */
export function presentationGate(
  stored: StoredSession,
  demand: RotationDemand,
  lockValidUntil: number,
  now: number,
  options: GateOptions,
): GateDecision {
  const record = stored.record;
  if (record.status !== 'ACTIVE') return { kind: 'inactive' };
  if (demand.kind === 'generation' && record.generation !== demand.generation)
    return { kind: 'stale' };
  if (demand.kind === 'due') {
    if (stored.lastUsedAt + options.idleTimeoutMs < now) return { kind: 'idle' };
    // An attempt that started and never finished (its replica died) must be resolved now.
    const unfinished = stored.inflight?.generation === record.generation;
    if (record.nextRefreshAt > now && !unfinished)
      return { kind: 'not-due', dueAt: record.nextRefreshAt };
  }
  const deadline = now + options.idpTimeoutMs;
  if (lockValidUntil - options.lockMarginMs < deadline)
    return { kind: 'lock-too-short', retryAt: now + options.busyRetryMs };
  return { kind: 'present', deadline };
}
