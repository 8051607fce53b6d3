import type { SessionRef } from '../../shared/session-ref.js';
import type { SessionStatusName } from '../../shared/session-status.js';

export type { SessionRef, SessionStatusName };

/**
 * A system user's login, kept so the broker can log in again when the token family ends. The
 * password is either here (sealed at rest with the whole record) or a file name under
 * TB_SECRETS_DIR that is read at each login.
 */
export interface StoredLogin {
  username: string;
  password?: string | undefined;
  passwordFile?: string | undefined;
}

/**
 * Everything the broker knows about one session. Stored sealed (JWE); times are epoch ms, 0 when
 * unknown. `generation` increases with every published change (rotation or status change).
 */
export interface SessionRecord extends SessionRef {
  idp: string;
  generation: number;
  status: SessionStatusName;
  /** Empty while the session holds no access token (just enrolled, before the first rotation). */
  accessToken: string;
  tokenType: string;
  accessExpiresAt: number;
  refreshToken: string;
  refreshExpiresAt: number;
  /** When the current access token was obtained. */
  issuedAt: number;
  /** When the broker plans the next rotation (or retry); 0 when none is planned. */
  nextRefreshAt: number;
  /** Stable code of the last failed refresh; empty after a success. */
  lastErrorCode: string;
  failedAttempts: number;
  /** W3C traceparent of the rotation that produced this generation, for watchers. */
  traceparent: string;
  /**
   * Set for a session enrolled with a login. An empty `refreshToken` then means "log in next":
   * at enrollment, and after the family ended (invalid_grant).
   */
  login?: StoredLogin | undefined;
  /** When the broker last logged in for this session (epoch ms); bounds logging in ahead. */
  loggedInAt?: number | undefined;
  /** Logins since the last successful refresh; bounds logging in again when refreshes keep failing. */
  reloginStreak?: number | undefined;
  /**
   * The refresh token was presented and no answer came back (timeout, reset): the IdP may have
   * consumed it. The next attempt asks the IdP (introspection) before presenting it again.
   */
  outcomeUnknown?: boolean | undefined;
  /** Who enrolled the current family (namespace/serviceaccount); undefined without authentication. */
  enrolledBy?: string | undefined;
  /**
   * The enrollment this family belongs to (random hex, new at each Enroll, kept by every other
   * transition). Watchers apply the generation order within one epoch only, so a session enrolled
   * again after its state was lost (generations restarting at 1) is served at once. Undefined in
   * records written before epochs existed: they read as epoch ''.
   */
  epoch?: string | undefined;
}

/** A record's epoch; '' for a record written before epochs existed. */
export function epochOf(record: Pick<SessionRecord, 'epoch'>): string {
  return record.epoch ?? '';
}

/** Statuses whose sessions the retention sweep deletes once dead for TB_SESSION_RETENTION_MS. */
export const DEAD_STATUSES: ReadonlySet<SessionStatusName> = new Set([
  'REVOKED',
  'REAUTH_REQUIRED',
  'IDLE',
]);

/** A stored record with the fields kept beside it in plain text. */
export interface StoredSession {
  record: SessionRecord;
  /** Last time a reader or watcher used the session (epoch ms). */
  lastUsedAt: number;
  /** The presentation in flight for the current generation, if any. */
  inflight: InflightMarker | undefined;
}

/**
 * Written (compare-and-set on the generation) before the refresh token is presented to the IdP.
 * Until `deadline` the presentation may still be in flight, so no one else may present it.
 */
export interface InflightMarker {
  generation: number;
  /** Epoch ms after which the attempt cannot still be in flight (its call is aborted by then). */
  deadline: number;
  replica: string;
  attemptId: string;
}

/** What a publish carries: watchers re-read the record, so no token ever travels in an event. */
export interface SessionEvent extends SessionRef {
  generation: number;
  /** The record's epoch; absent from replicas that predate epochs. */
  epoch?: string | undefined;
}

/** A metadata view of a record: never token values, never login credentials. */
export type SessionMetadata = Omit<SessionRecord, 'accessToken' | 'refreshToken' | 'login'> & {
  lastUsedAt: number;
};

export function metadataOf(stored: StoredSession): SessionMetadata {
  const { accessToken: _a, refreshToken: _r, login: _l, ...rest } = stored.record;
  return { ...rest, lastUsedAt: stored.lastUsedAt };
}
