import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { decideRead } from '../../sidecar/read-policy.js';
import { TokenStore, type TokenState } from '../../sidecar/token-store.js';

const T0 = Date.parse('2026-01-01T00:00:00Z');
const SKEW = 10_000;
const alice = { tenant: 'diku', user: 'alice' };

function state(generation: number, extra: Partial<TokenState> = {}): TokenState {
  return {
    epoch: '',
    generation,
    status: 'ACTIVE',
    accessToken: `at-${generation}`,
    tokenType: 'Bearer',
    expiresAtMs: T0 + 60_000,
    errorCode: '',
    ...extra,
  };
}

let now = T0;
let store: TokenStore;
beforeEach(() => {
  now = T0;
  store = new TokenStore({ safetySkewMs: SKEW }, () => now);
});

describe('TokenStore', () => {
  it('keeps only the newest generation: older and equal ones are dropped', () => {
    const { entry, created } = store.ensure(alice);
    expect(created).toBe(true);
    expect(store.apply(alice, state(5))).toBe('applied');
    expect(store.apply(alice, state(3))).toBe('stale');
    expect(store.apply(alice, state(5, { accessToken: 'other' }))).toBe('stale');
    expect(entry.state?.accessToken).toBe('at-5');
    expect(store.apply(alice, state(6))).toBe('applied');
    expect(entry.state?.generation).toBe(6);
    expect(entry.expiresAtIso).toBe('2026-01-01T00:01:00.000Z');
    // A terminal state is a generation like any other: it replaces the token, and never reverts.
    expect(store.apply(alice, state(7, { status: 'REAUTH_REQUIRED', accessToken: '' }))).toBe(
      'applied',
    );
    expect(store.apply(alice, state(6))).toBe('stale');
    expect(entry.state?.status).toBe('REAUTH_REQUIRED');
  });

  it('ignores events for users it does not watch', () => {
    expect(store.apply(alice, state(1))).toBe('unwatched');
    expect(store.size).toBe(0);
  });

  it('is fresh only while more than the safety skew is left', () => {
    const { entry } = store.ensure(alice);
    store.apply(alice, state(1));
    now = T0 + 60_000 - SKEW - 1;
    expect(store.isFresh(entry)).toBe(true);
    now = T0 + 60_000 - SKEW;
    expect(store.isFresh(entry)).toBe(false);
    now = T0 + 70_000;
    expect(store.isFresh(entry)).toBe(false);
    store.apply(alice, state(2, { expiresAtMs: T0 + 200_000 }));
    expect(store.isFresh(entry)).toBe(true);
    store.apply(alice, state(3, { expiresAtMs: T0 + 200_000, status: 'IDLE', accessToken: '' }));
    expect(store.isFresh(entry)).toBe(false);
  });

  it('marks a user not found until its first state arrives', () => {
    const { entry } = store.ensure(alice);
    store.markNotFound(alice);
    expect(entry.notFound).toBe(true);
    store.apply(alice, state(1));
    expect(entry.notFound).toBe(false);
    store.markNotFound(alice);
    expect(entry.notFound).toBe(false);
  });

  it('lists idle users by last read, never pinned ones', () => {
    store.ensure(alice, true);
    const bob = store.ensure({ tenant: 'diku', user: 'bob' }).entry;
    now = T0 + 5_000;
    expect(store.idleSince(1_000)).toEqual([bob]);
    bob.lastReadAt = now;
    expect(store.idleSince(1_000)).toEqual([]);
  });

  describe('waiting', () => {
    beforeEach(() => vi.useFakeTimers());
    afterEach(() => vi.useRealTimers());

    it('wakes a waiter on a change, or at its timeout', async () => {
      const { entry } = store.ensure(alice);
      let woke = false;
      const waiting = store.waitForChange(entry, 5_000).then(() => (woke = true));
      await vi.advanceTimersByTimeAsync(100);
      expect(woke).toBe(false);
      store.apply(alice, state(1));
      await waiting;
      expect(entry.waiters.size).toBe(0);

      let timedOut = false;
      const second = store.waitForChange(entry, 1_000).then(() => (timedOut = true));
      store.apply(alice, state(1));
      await vi.advanceTimersByTimeAsync(999);
      expect(timedOut).toBe(false);
      await vi.advanceTimersByTimeAsync(1);
      await second;
      expect(timedOut).toBe(true);
    });
  });
});

describe('decideRead', () => {
  const decide = (minGeneration: number, final: boolean) =>
    decideRead(store, store.get('diku', 'alice')!, minGeneration, final, 1234, now);

  it('serves a fresh token of at least min_generation', () => {
    store.ensure(alice);
    store.apply(alice, state(4));
    expect(decide(0, false).kind).toBe('serve');
    expect(decide(4, true).kind).toBe('serve');
  });

  it('waits for a newer generation with a Refresh, then times out with 504 WAIT_TIMEOUT', () => {
    store.ensure(alice);
    store.apply(alice, state(4));
    expect(decide(5, false)).toEqual({ kind: 'wait', refresh: true });
    const timeout = decide(5, true);
    expect(timeout.kind === 'fail' && [timeout.error.status, timeout.error.code]).toEqual([
      504,
      'WAIT_TIMEOUT',
    ]);
  });

  it('never serves a token within the skew: waits, then 503 TOKEN_UNAVAILABLE with Retry-After', () => {
    store.ensure(alice);
    store.apply(alice, state(4));
    now = T0 + 60_000 - SKEW;
    // While waiting, another replica is asked (GetToken): this stream's replica may be frozen.
    expect(decide(0, false)).toEqual({ kind: 'wait', refresh: false, fetch: true });
    const failed = decide(0, true);
    if (failed.kind !== 'fail') throw new Error('expected a failure');
    expect([failed.error.status, failed.error.code]).toEqual([503, 'TOKEN_UNAVAILABLE']);
    expect(failed.error.headers()['retry-after']).toMatch(/^\d+$/);
  });

  it('answers terminal states at once, even before the wait ends', () => {
    store.ensure(alice);
    store.apply(alice, state(4, { status: 'REAUTH_REQUIRED', accessToken: '' }));
    const reauth = decide(9, false);
    expect(reauth.kind === 'fail' && [reauth.error.status, reauth.error.code]).toEqual([
      409,
      'REAUTH_REQUIRED',
    ]);
    store.apply(alice, state(5, { status: 'REVOKED', accessToken: '' }));
    const revoked = decide(0, false);
    expect(revoked.kind === 'fail' && [revoked.error.status, revoked.error.code]).toEqual([
      410,
      'SESSION_REVOKED',
    ]);
  });

  it('tells an unknown user (404) from no answer yet (503) once the wait is over', () => {
    store.ensure(alice);
    expect(decide(0, false)).toEqual({ kind: 'wait', refresh: false });
    const noAnswer = decide(0, true);
    expect(noAnswer.kind === 'fail' && noAnswer.error.code).toBe('TOKEN_UNAVAILABLE');
    store.markNotFound(alice);
    const unknown = decide(0, true);
    expect(unknown.kind === 'fail' && [unknown.error.status, unknown.error.code]).toEqual([
      404,
      'SESSION_NOT_FOUND',
    ]);
  });

  it('an idle session waits for its reactivation, then 503', () => {
    store.ensure(alice);
    store.apply(alice, state(4, { status: 'IDLE', accessToken: '' }));
    expect(decide(0, false).kind).toBe('wait');
    const idle = decide(0, true);
    expect(idle.kind === 'fail' && idle.error.message).toMatch(/idle/);
  });
});

describe('epochs', () => {
  it('takes a new epoch at once (generation 1 after 500), and never the retired one again', () => {
    const { entry } = store.ensure(alice);
    expect(store.apply(alice, state(500, { epoch: 'aaaa' }))).toBe('applied');
    // Enrolled again after the broker lost its state: generations restart in a new epoch.
    expect(store.apply(alice, state(1, { epoch: 'bbbb', accessToken: 'new-1' }))).toBe('applied');
    expect(entry.state).toMatchObject({ epoch: 'bbbb', generation: 1, accessToken: 'new-1' });
    expect(decideRead(store, entry, 0, true, 0, now).kind).toBe('serve');
    // A lagging replica still streaming the old epoch cannot bring it back, whatever its number.
    expect(store.apply(alice, state(501, { epoch: 'aaaa' }))).toBe('stale');
    expect(store.apply(alice, state(1, { epoch: 'bbbb' }))).toBe('stale');
    expect(store.apply(alice, state(2, { epoch: 'bbbb', accessToken: 'new-2' }))).toBe('applied');
    expect(entry.state?.accessToken).toBe('new-2');
  });

  it('a state without an epoch (a broker that predates epochs) counts in the epoch held', () => {
    const { entry } = store.ensure(alice);
    store.apply(alice, state(4, { epoch: 'cccc' }));
    expect(store.apply(alice, state(4, { epoch: '' }))).toBe('stale');
    expect(store.apply(alice, state(5, { epoch: '' }))).toBe('applied');
    expect(entry.state?.epoch).toBe('cccc');
    // ... so the next state of that epoch is still compared by generation.
    expect(store.apply(alice, state(5, { epoch: 'cccc' }))).toBe('stale');
    // A legacy-held entry ('' epoch) takes the first real epoch at once.
    const bob = { tenant: 'diku', user: 'bob' };
    const held = store.ensure(bob).entry;
    store.apply(bob, state(300, { epoch: '' }));
    expect(store.apply(bob, state(1, { epoch: 'dddd' }))).toBe('applied');
    expect(held.state?.generation).toBe(1);
  });
});

describe('effective safety skew', () => {
  const short = (generation: number, lifetimeMs: number, issuedAtMs = now) =>
    state(generation, { issuedAtMs, expiresAtMs: issuedAtMs + lifetimeMs });

  it('serves 6-second tokens: the skew shrinks to a quarter of the lifetime, with one warning', () => {
    const warnings: { skewMs: number; lifetimeMs: number | undefined }[] = [];
    store = new TokenStore(
      { safetySkewMs: SKEW, onSkewShrunk: (_e, s) => warnings.push(s) },
      () => now,
    );
    const { entry } = store.ensure(alice);
    store.apply(alice, short(1, 6_000));
    expect(entry.skewMs).toBe(1_500);
    now = T0 + 4_499;
    expect(decideRead(store, entry, 0, true, 0, now).kind).toBe('serve');
    now = T0 + 4_500;
    expect(store.isFresh(entry)).toBe(false);
    // Each rotation of the same lifetime keeps quiet; another lifetime warns again.
    store.apply(alice, short(2, 6_000));
    store.apply(alice, short(3, 6_000));
    expect(warnings).toEqual([expect.objectContaining({ skewMs: 1_500, lifetimeMs: 6_000 })]);
    store.apply(alice, short(4, 8_000));
    expect(warnings.map((w) => w.skewMs)).toEqual([1_500, 2_000]);
    // A long-lived token gets the configured skew back, without a warning.
    store.apply(alice, short(5, 120_000));
    expect(entry.skewMs).toBe(SKEW);
    expect(warnings).toHaveLength(2);
  });

  it('the 503 says which skew applied and why', () => {
    const { entry } = store.ensure(alice);
    store.apply(alice, short(7, 6_000));
    now = T0 + 5_000;
    const shrunk = decideRead(store, entry, 0, true, 0, now);
    if (shrunk.kind !== 'fail') throw new Error('expected a failure');
    expect(shrunk.error.message).toMatch(
      /generation 7\b.*skew of 1\.5 s \(a quarter of the token's 6 s lifetime, smaller than TB_SIDECAR_SAFETY_SKEW_MS 10 s\)/,
    );
    store.apply(alice, short(8, 60_000));
    now = T0 + 55_000;
    const configured = decideRead(store, entry, 0, true, 0, now);
    if (configured.kind !== 'fail') throw new Error('expected a failure');
    expect(configured.error.message).toMatch(/skew of 10 s \(TB_SIDECAR_SAFETY_SKEW_MS\)/);
    expect(configured.error.message).not.toMatch(/quarter/);
  });

  it('without issued_at, the lifetime counts from receipt', () => {
    const { entry } = store.ensure(alice);
    store.apply(alice, state(1, { receivedAtMs: now, expiresAtMs: now + 6_000 }));
    expect(entry.skewMs).toBe(1_500);
  });
});
