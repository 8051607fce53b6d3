import type { SessionRecord } from '../store/session-record.js';

/**
 * Every rotation timing decision the broker makes. Pure: times are epoch milliseconds passed in
 * by the caller, randomness is injected, and nothing here reads a clock or does I/O.
 */
export interface RotationPolicyOptions {
  /** Fraction of the access token's lifetime after which a refresh is due. In (0, 1). */
  ratio: number;
  /** Jitter as a fraction of the lifetime; it only ever moves the due time earlier. In [0, ratio). */
  jitterRatio: number;
  /** A refresh is due no later than this long before the access token expires (long TTLs). */
  minLeadMs: number;
  /**
   * Floor for short lifetimes, as a fraction of the ratio point: a refresh is never due before
   * `issuedAt + minAgeRatio * ratio * ttl`, so a TTL shorter than minLeadMs cannot turn into a
   * refresh loop. In [0, 1].
   */
  minAgeRatio: number;
  /** Backoff delay after the first failure; it doubles per attempt. */
  retryBaseMs: number;
  /** Cap of the backoff delay. */
  retryMaxMs: number;
  /** Cap of an IdP's Retry-After, so a bogus header cannot park a session for hours. */
  maxRetryAfterMs: number;
  /** While the access token is valid, the last retry lands at least this long before it expires. */
  expiryMarginMs: number;
}

export const DEFAULT_ROTATION_POLICY: Readonly<RotationPolicyOptions> = Object.freeze({
  ratio: 0.75,
  jitterRatio: 0.05,
  minLeadMs: 10_000,
  minAgeRatio: 0.5,
  retryBaseMs: 500,
  retryMaxMs: 30_000,
  maxRetryAfterMs: 300_000,
  expiryMarginMs: 2_000,
});

/**
 * Decides when a session is due for rotation and when a failed rotation is retried.
 *
 * Due time, for `ttl = accessExpiresAt - issuedAt`:
 *   due = max(issuedAt + minAgeRatio * ratio * ttl,
 *             min(issuedAt + ratio * ttl, accessExpiresAt - minLeadMs) - random() * jitterRatio * ttl)
 * Jitter is applied after the lead clamp so long-lived tokens clamped to the lead still spread
 * out. The floor wins over the lead only for short TTLs
 * (`ttl < minLeadMs / (1 - minAgeRatio * ratio)`, 16 s by default): then the token cannot be
 * refreshed with that lead without refreshing almost at once, so it is refreshed at the floor.
 * The result always lies in [issuedAt, accessExpiresAt]; `ttl <= 0` (already expired) is due at
 * issuedAt, i.e. now.
 *
 * Retry time after failure number `attempt` (1 = first failure):
 *   backoff = min(retryMaxMs, retryBaseMs * 2^(attempt-1)), with equal jitter (half fixed, half
 *   random), so it lies in [backoff/2, backoff];
 *   while the access token is valid and `accessExpiresAt - expiryMarginMs` is at least
 *   retryBaseMs away, the backoff is shortened to land no later than that point, so one more try
 *   happens before the token expires;
 *   Retry-After (capped at maxRetryAfterMs) is a floor that wins over that shortening, since
 *   retrying a rate-limited IdP early only earns another 429.
 * The delay is therefore bounded by max(retryMaxMs, maxRetryAfterMs) and the result is always
 * after `now`.
 */
export class RotationPolicy {
  readonly options: Readonly<RotationPolicyOptions>;
  readonly #random: () => number;

  /** `options` are already valid (config.ts checks them at start-up); unset ones take defaults. */
  constructor(options: Partial<RotationPolicyOptions> = {}, random: () => number = Math.random) {
    const merged: RotationPolicyOptions = { ...DEFAULT_ROTATION_POLICY };
    for (const [key, value] of Object.entries(options) as [
      keyof RotationPolicyOptions,
      unknown,
    ][]) {
      // An unset setting arrives as undefined and keeps its default.
      if (value !== undefined) merged[key] = value as number;
    }
    this.options = Object.freeze(merged);
    this.#random = random;
  }

  /** When a token issued at `issuedAt` and expiring at `accessExpiresAt` is due (integer ms). */
  nextRefreshAt(issuedAt: number, accessExpiresAt: number): number {
    requireFinite('issuedAt', issuedAt);
    requireFinite('accessExpiresAt', accessExpiresAt);
    const { ratio, jitterRatio, minLeadMs, minAgeRatio } = this.options;
    const ttl = accessExpiresAt - issuedAt;
    if (ttl <= 0) return Math.floor(issuedAt);

    const floor = Math.ceil(issuedAt + minAgeRatio * ratio * ttl);
    const latest = Math.min(issuedAt + ratio * ttl, accessExpiresAt - minLeadMs);
    const jittered = Math.floor(latest - this.#unit() * jitterRatio * ttl);
    return Math.min(Math.max(floor, jittered), Math.floor(accessExpiresAt));
  }

  /**
   * When to retry after failure number `attempt` (1 = first failure) at `now`, given the IdP's
   * Retry-After if it sent one. Integer ms, always after `now`.
   */
  retryAt(
    now: number,
    attempt: number,
    retryAfterMs: number | undefined,
    accessExpiresAt: number,
  ): number {
    requireFinite('now', now);
    requireFinite('accessExpiresAt', accessExpiresAt);
    const { retryBaseMs, retryMaxMs, maxRetryAfterMs, expiryMarginMs } = this.options;
    const failures = Number.isFinite(attempt) ? Math.max(1, Math.floor(attempt)) : 1;

    const ceiling = Math.min(retryMaxMs, retryBaseMs * 2 ** (failures - 1));
    let delay = ceiling / 2 + (this.#unit() * ceiling) / 2;

    const lastChance = accessExpiresAt - expiryMarginMs;
    if (lastChance - now >= retryBaseMs) delay = Math.min(delay, lastChance - now);

    if (retryAfterMs !== undefined && Number.isFinite(retryAfterMs) && retryAfterMs > 0) {
      delay = Math.max(delay, Math.min(retryAfterMs, maxRetryAfterMs));
    }
    return Math.floor(now) + Math.max(1, Math.ceil(delay));
  }

  /** The injected random value, forced into [0, 1] so a bad source cannot break the bounds. */
  #unit(): number {
    const value = this.#random();
    return Number.isFinite(value) ? Math.min(1, Math.max(0, value)) : 0;
  }
}

function requireFinite(what: string, value: number): void {
  if (!Number.isFinite(value)) throw new RangeError(`${what} must be a finite number of ms`);
}

/** What the login-ahead decision looks at in a session record. */
export type LoginFamily = Pick<
  SessionRecord,
  'login' | 'refreshToken' | 'refreshExpiresAt' | 'loggedInAt'
>;

/**
 * When a session enrolled with a login should log in again before its token family ends (its
 * refresh token's `refreshExpiresAt`, e.g. Keycloak's SSO session maximum): `marginMs` before
 * that end, but never sooner than `marginMs` after its last login, so a family that is shorter
 * than the margin is not logged into on every rotation (it then ends, and the session logs in
 * again after the IdP's invalid_grant, as before). Undefined: no login, no known end, or no room.
 */
export function loginAheadAt(record: LoginFamily, marginMs: number): number | undefined {
  if (record.login === undefined || record.refreshToken === '' || marginMs <= 0) return undefined;
  if (!(record.refreshExpiresAt > 0)) return undefined;
  const at = Math.max(record.refreshExpiresAt - marginMs, (record.loggedInAt ?? 0) + marginMs);
  return at < record.refreshExpiresAt ? at : undefined;
}

/** The due time of a rotation, brought forward to the login-ahead time when there is one. */
export function dueWithLoginAhead(dueAt: number, record: LoginFamily, marginMs: number): number {
  const ahead = loginAheadAt(record, marginMs);
  return ahead === undefined ? dueAt : Math.min(dueAt, ahead);
}
