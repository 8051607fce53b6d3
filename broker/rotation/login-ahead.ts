import type { SessionRecord } from '../store/session-record.js';

/**
 * When a session enrolled with a login should log in again before its token family ends (its
 * refresh token's `refreshExpiresAt`, e.g. Keycloak's SSO session maximum): `marginMs` before
 * that end, but never sooner than `marginMs` after its last login, so a family that is shorter
 * than the margin is not logged into on every rotation (it then ends, and the session logs in
 * again after the IdP's invalid_grant, as before). Undefined: no login, no known end, or no room.
 */
export function loginAheadAt(
  record: Pick<SessionRecord, 'login' | 'refreshToken' | 'refreshExpiresAt' | 'loggedInAt'>,
  marginMs: number,
): number | undefined {
  if (record.login === undefined || record.refreshToken === '' || marginMs <= 0) return undefined;
  if (!(record.refreshExpiresAt > 0)) return undefined;
  const at = Math.max(record.refreshExpiresAt - marginMs, (record.loggedInAt ?? 0) + marginMs);
  return at < record.refreshExpiresAt ? at : undefined;
}

/** The due time of a rotation, brought forward to the login-ahead time when there is one. */
export function dueWithLoginAhead(
  dueAt: number,
  record: Pick<SessionRecord, 'login' | 'refreshToken' | 'refreshExpiresAt' | 'loggedInAt'>,
  marginMs: number,
): number {
  const ahead = loginAheadAt(record, marginMs);
  return ahead === undefined ? dueAt : Math.min(dueAt, ahead);
}
