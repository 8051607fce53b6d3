import { randomBytes } from 'node:crypto';
import type { TokenSet } from './idp/idp-adapter.js';
import type { SessionRecord, SessionRef, StoredLogin } from './store/session-record.js';

/**
 * Every way a session's record changes, as pure functions: each takes the record (and what
 * happened) and returns the next record with when the session is next due. Nothing here reads a
 * clock, calls a store or decides timing: callers pass `now`, the trace context and the due
 * times the rotation policy computed. The store commits a transition atomically (write, compare-
 * and-set on the generation, publish, and due-queue entry in one step).
 *
 * A change that watchers must see (a new token or a new status) raises the generation; a change
 * only the broker cares about (a retry, a forgotten family) keeps it, so nothing is published.
 */
export interface Transition {
  next: SessionRecord;
  /** When the session is next due for rotation; undefined: not due at all (leave the queue). */
  dueAt: number | undefined;
}

/** The trace context of the change, stored in the record so each Watch event carries it. */
type Traceparent = string;

/** The credential an enrollment starts a family from. */
export interface FamilySeed {
  /** A dedicated refresh token, or '' for a login session that still has to log in. */
  refreshToken: string;
  login: StoredLogin | undefined;
  /** The caller enrolling it (namespace/serviceaccount), for ListSessions and the audit. */
  enrolledBy: string | undefined;
  /** The new family's epoch; default a fresh random one (tests pass their own). */
  epoch?: string | undefined;
}

/**
 * A new epoch id: 64 random bits in hex. Random rather than counted, so an enrollment after the
 * state store lost everything still gets an epoch no sidecar has seen.
 */
export function newEpoch(): string {
  return randomBytes(8).toString('hex');
}

/**
 * A new family for the session (Enroll), replacing any earlier one, in a new epoch (the only
 * transition that changes it). Enroll passes `issued`: the pair its first rotation, login or
 * exchange obtained, a new generation at once, due at `nextRefreshAt`. Without it the family must
 * still be rotated or logged into: due now, so the due queue finishes it.
 */
export function enrolled(
  ref: SessionRef,
  idp: string,
  seed: FamilySeed,
  previous: SessionRecord | undefined,
  at: { now: number; traceparent: Traceparent },
  issued?: { tokens: TokenSet; nextRefreshAt: number },
): Transition {
  const base: SessionRecord = {
    tenant: ref.tenant,
    user: ref.user,
    idp,
    generation: previous?.generation ?? 0,
    status: 'ACTIVE',
    accessToken: previous?.accessToken ?? '',
    tokenType: previous?.tokenType ?? 'Bearer',
    accessExpiresAt: previous?.accessExpiresAt ?? 0,
    refreshToken: seed.refreshToken,
    refreshExpiresAt: 0,
    issuedAt: previous?.issuedAt ?? 0,
    nextRefreshAt: at.now,
    lastErrorCode: '',
    failedAttempts: 0,
    traceparent: at.traceparent,
    login: seed.login,
    reloginStreak: 0,
    enrolledBy: seed.enrolledBy,
    epoch: seed.epoch ?? newEpoch(),
  };
  if (!issued) return { next: base, dueAt: at.now };
  const { tokens, nextRefreshAt } = issued;
  return {
    next: {
      ...base,
      generation: base.generation + 1,
      accessToken: tokens.accessToken,
      tokenType: tokens.tokenType,
      accessExpiresAt: tokens.accessExpiresAt,
      refreshExpiresAt: tokens.refreshExpiresAt ?? 0,
      issuedAt: at.now,
      loggedInAt: seed.login ? at.now : undefined,
      nextRefreshAt,
    },
    dueAt: nextRefreshAt,
  };
}

/**
 * The IdP answered a refresh (or a login) with a new pair, obtained at `issuedAt`. A refresh that
 * worked proves the family lives, which ends a relogin streak; a login alone does not.
 */
export function rotated(
  record: SessionRecord,
  tokens: TokenSet,
  at: { issuedAt: number; nextRefreshAt: number; traceparent: Traceparent; loggedIn: boolean },
): Transition {
  const next: SessionRecord = {
    ...record,
    generation: record.generation + 1,
    status: 'ACTIVE',
    accessToken: tokens.accessToken,
    tokenType: tokens.tokenType,
    accessExpiresAt: tokens.accessExpiresAt,
    // An IdP that does not rotate keeps the old refresh token (and its expiry).
    refreshToken: tokens.refreshToken ?? record.refreshToken,
    refreshExpiresAt:
      tokens.refreshExpiresAt ?? (tokens.refreshToken ? 0 : record.refreshExpiresAt),
    issuedAt: at.issuedAt,
    nextRefreshAt: at.nextRefreshAt,
    lastErrorCode: '',
    failedAttempts: 0,
    traceparent: at.traceparent,
    reloginStreak: at.loggedIn ? record.reloginStreak : 0,
    loggedInAt: at.loggedIn ? at.issuedAt : record.loggedInAt,
    outcomeUnknown: false,
  };
  return { next, dueAt: at.nextRefreshAt };
}

/** The family is dead (invalid_grant, or a refused login): terminal until a new enrollment. */
export function reauthRequired(
  record: SessionRecord,
  code: string,
  traceparent: Traceparent,
): Transition {
  return {
    next: {
      ...record,
      generation: record.generation + 1,
      status: 'REAUTH_REQUIRED',
      nextRefreshAt: 0,
      lastErrorCode: code,
      failedAttempts: record.failedAttempts + 1,
      traceparent,
    },
    dueAt: undefined,
  };
}

/**
 * A transient failure: try again at `retryAt` on the current token. `outcomeUnknown` records that
 * the refresh token was presented without an answer, so the next attempt asks before presenting.
 */
export function retryScheduled(
  record: SessionRecord,
  failure: { code: string; retryAt: number; outcomeUnknown: boolean },
): Transition {
  return {
    next: {
      ...record,
      ...(failure.outcomeUnknown ? { outcomeUnknown: true } : {}),
      nextRefreshAt: failure.retryAt,
      lastErrorCode: failure.code,
      failedAttempts: record.failedAttempts + 1,
    },
    dueAt: failure.retryAt,
  };
}

/** No reader or watcher used the session for the idle timeout: it stops being refreshed. */
export function idle(record: SessionRecord, traceparent: Traceparent): Transition {
  return {
    next: {
      ...record,
      generation: record.generation + 1,
      status: 'IDLE',
      nextRefreshAt: 0,
      traceparent,
    },
    dueAt: undefined,
  };
}

/** An idle session is read or watched again: active, and due now for a fresh token. */
export function reactivated(
  record: SessionRecord,
  now: number,
  traceparent: Traceparent,
): Transition {
  return {
    next: {
      ...record,
      generation: record.generation + 1,
      status: 'ACTIVE',
      nextRefreshAt: now,
      traceparent,
    },
    dueAt: now,
  };
}

/** Revoke: the broker forgets both tokens and stops refreshing at once. */
export function revoked(record: SessionRecord, traceparent: Traceparent): Transition {
  return {
    next: {
      ...record,
      generation: record.generation + 1,
      status: 'REVOKED',
      accessToken: '',
      refreshToken: '',
      nextRefreshAt: 0,
      traceparent,
    },
    dueAt: undefined,
  };
}

/**
 * A login session's family ended (invalid_grant): the dead refresh token is forgotten first, so no
 * one presents it again even if this replica dies, and the session is due now to log in again.
 * The streak counts logins without a working refresh in between, which bounds the loop.
 */
export function familyForgotten(record: SessionRecord, code: string, now: number): Transition {
  return {
    next: {
      ...record,
      refreshToken: '',
      refreshExpiresAt: 0,
      reloginStreak: (record.reloginStreak ?? 0) + 1,
      nextRefreshAt: now,
      lastErrorCode: code,
    },
    dueAt: now,
  };
}
