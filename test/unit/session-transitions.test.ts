import { describe, expect, it } from 'vitest';
import { presentationGate } from '../../broker/rotation/presentation-gate.js';
import {
  enrolled,
  familyForgotten,
  idle,
  reactivated,
  reauthRequired,
  retryScheduled,
  revoked,
  rotated,
} from '../../broker/session-transitions.js';
import type { SessionRecord, StoredSession } from '../../broker/store/session-record.js';

const NOW = 1_800_000_000_000;
const TP = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
const REF = { tenant: 'diku', user: 'alice' };

/** Generation 4 of an active session, mid-life, after two failed attempts. */
function active(): SessionRecord {
  return {
    ...REF,
    idp: 'default',
    generation: 4,
    status: 'ACTIVE',
    accessToken: 'at-FAKE-4',
    tokenType: 'Bearer',
    accessExpiresAt: NOW + 60_000,
    refreshToken: 'rt-FAKE-4',
    refreshExpiresAt: NOW + 3_600_000,
    issuedAt: NOW - 30_000,
    nextRefreshAt: NOW + 15_000,
    lastErrorCode: 'IDP_UNAVAILABLE',
    failedAttempts: 2,
    traceparent: '',
    login: { username: 'sys', password: 'pw-FAKE' },
    reloginStreak: 1,
    outcomeUnknown: true,
  };
}

const PAIR = {
  accessToken: 'at-FAKE-5',
  tokenType: 'Bearer',
  accessExpiresAt: NOW + 120_000,
  refreshToken: 'rt-FAKE-5',
  refreshExpiresAt: NOW + 7_200_000,
};

describe('session transitions (pure)', () => {
  it('enrolled: a new family due now, keeping the generation (and the old token until rotated)', () => {
    const seed = {
      refreshToken: 'rt-FAKE-dedicated',
      login: undefined,
      enrolledBy: 'folio/mod-login',
    };
    const fresh = enrolled(REF, 'default', seed, undefined, { now: NOW, traceparent: TP });
    expect(fresh.dueAt).toBe(NOW);
    expect(fresh.next).toMatchObject({ generation: 0, status: 'ACTIVE', accessToken: '' });
    expect(fresh.next.refreshToken === 'rt-FAKE-dedicated').toBe(true);

    const previous = { ...active(), status: 'REAUTH_REQUIRED' as const };
    const again = enrolled(REF, 'other', seed, previous, { now: NOW, traceparent: TP });
    expect(again.next).toMatchObject({
      generation: 4,
      status: 'ACTIVE',
      idp: 'other',
      failedAttempts: 0,
      lastErrorCode: '',
      reloginStreak: 0,
      traceparent: TP,
    });
    expect(again.next.accessToken === previous.accessToken).toBe(true);
    expect(again.next.login).toBeUndefined();
    expect(again.next.enrolledBy).toBe('folio/mod-login');
    expect(again.next.outcomeUnknown).toBeUndefined();
    // Each enrollment starts a new epoch (random 64-bit hex), unless the caller names one.
    expect(fresh.next.epoch).toMatch(/^[0-9a-f]{16}$/);
    expect(again.next.epoch).toMatch(/^[0-9a-f]{16}$/);
    expect(again.next.epoch).not.toBe(fresh.next.epoch);
    expect(
      enrolled(REF, 'default', { ...seed, epoch: 'e1' }, previous, { now: NOW, traceparent: TP })
        .next.epoch,
    ).toBe('e1');

    // A token exchange issues the family at once: a new generation, due by the policy's time.
    const issued = enrolled(
      REF,
      'default',
      seed,
      previous,
      { now: NOW, traceparent: TP },
      {
        tokens: PAIR,
        nextRefreshAt: NOW + 90_000,
      },
    );
    expect(issued.next).toMatchObject({
      generation: 5,
      accessExpiresAt: PAIR.accessExpiresAt,
      refreshExpiresAt: PAIR.refreshExpiresAt,
      issuedAt: NOW,
      nextRefreshAt: NOW + 90_000,
    });
    expect(issued.dueAt).toBe(NOW + 90_000);
  });

  it('rotated: the next generation with the new pair, errors and unknown outcome cleared', () => {
    const t = rotated(active(), PAIR, {
      issuedAt: NOW,
      nextRefreshAt: NOW + 90_000,
      traceparent: TP,
      loggedIn: false,
    });
    expect(t.dueAt).toBe(NOW + 90_000);
    expect(t.next).toMatchObject({
      generation: 5,
      status: 'ACTIVE',
      accessExpiresAt: PAIR.accessExpiresAt,
      refreshExpiresAt: PAIR.refreshExpiresAt,
      issuedAt: NOW,
      lastErrorCode: '',
      failedAttempts: 0,
      reloginStreak: 0,
      outcomeUnknown: false,
      traceparent: TP,
    });
    expect(t.next.refreshToken === 'rt-FAKE-5').toBe(true);
    // A login is not proof the family lives: the streak stays.
    expect(rotated(active(), PAIR, { ...at(), loggedIn: true }).next.reloginStreak).toBe(1);
    // An IdP that keeps the refresh token: the old one (and its expiry) stays.
    const kept = rotated(
      active(),
      { ...PAIR, refreshToken: undefined, refreshExpiresAt: undefined },
      at(),
    );
    expect(kept.next.refreshToken === 'rt-FAKE-4').toBe(true);
    expect(kept.next.refreshExpiresAt).toBe(active().refreshExpiresAt);
    // A new refresh token without an expiry: unknown (0), not the old one's.
    const noExpiry = rotated(active(), { ...PAIR, refreshExpiresAt: undefined }, at());
    expect(noExpiry.next.refreshExpiresAt).toBe(0);
  });

  it('reauthRequired: a published terminal status that leaves the due queue', () => {
    const t = reauthRequired(active(), 'IDP_INVALID_GRANT', TP);
    expect(t.dueAt).toBeUndefined();
    expect(t.next).toMatchObject({
      generation: 5,
      status: 'REAUTH_REQUIRED',
      nextRefreshAt: 0,
      lastErrorCode: 'IDP_INVALID_GRANT',
      failedAttempts: 3,
      traceparent: TP,
    });
  });

  it('retryScheduled: same generation (nothing published), due at the retry time', () => {
    const record = { ...active(), outcomeUnknown: false };
    const t = retryScheduled(record, {
      code: 'IDP_UNAVAILABLE',
      retryAt: NOW + 700,
      outcomeUnknown: false,
    });
    expect(t.dueAt).toBe(NOW + 700);
    expect(t.next).toMatchObject({
      generation: 4,
      nextRefreshAt: NOW + 700,
      failedAttempts: 3,
      outcomeUnknown: false,
    });
    const presented = retryScheduled(record, {
      code: 'IDP_UNAVAILABLE',
      retryAt: NOW + 700,
      outcomeUnknown: true,
    });
    expect(presented.next.outcomeUnknown).toBe(true);
    // An earlier unknown outcome is not forgotten by a failure that surely did not present.
    expect(
      retryScheduled(active(), { code: 'X', retryAt: NOW, outcomeUnknown: false }).next
        .outcomeUnknown,
    ).toBe(true);
  });

  it('idle: a published status that leaves the due queue, tokens kept for reactivation', () => {
    const t = idle(active(), TP);
    expect(t.dueAt).toBeUndefined();
    expect(t.next).toMatchObject({
      generation: 5,
      status: 'IDLE',
      nextRefreshAt: 0,
      traceparent: TP,
    });
    expect(t.next.refreshToken === 'rt-FAKE-4').toBe(true);
  });

  it('reactivated: active again and due now', () => {
    const t = reactivated({ ...active(), status: 'IDLE', nextRefreshAt: 0 }, NOW, TP);
    expect(t.dueAt).toBe(NOW);
    expect(t.next).toMatchObject({
      generation: 5,
      status: 'ACTIVE',
      nextRefreshAt: NOW,
      traceparent: TP,
    });
  });

  it('revoked: both tokens forgotten, a published status, out of the due queue', () => {
    const t = revoked(active(), TP);
    expect(t.dueAt).toBeUndefined();
    expect(t.next).toMatchObject({
      generation: 5,
      status: 'REVOKED',
      accessToken: '',
      refreshToken: '',
      nextRefreshAt: 0,
    });
  });

  it('familyForgotten: the dead refresh token dropped at once, same generation, due now', () => {
    const t = familyForgotten(active(), 'IDP_INVALID_GRANT', NOW);
    expect(t.dueAt).toBe(NOW);
    expect(t.next).toMatchObject({
      generation: 4,
      status: 'ACTIVE',
      refreshToken: '',
      refreshExpiresAt: 0,
      reloginStreak: 2,
      nextRefreshAt: NOW,
      lastErrorCode: 'IDP_INVALID_GRANT',
    });
    expect(
      familyForgotten({ ...active(), reloginStreak: undefined }, 'X', NOW).next.reloginStreak,
    ).toBe(1);
  });

  it('never changes the record it was given', () => {
    const record = active();
    const before = structuredClone(record);
    rotated(record, PAIR, at());
    reauthRequired(record, 'X', TP);
    retryScheduled(record, { code: 'X', retryAt: NOW, outcomeUnknown: true });
    idle(record, TP);
    reactivated(record, NOW, TP);
    revoked(record, TP);
    familyForgotten(record, 'X', NOW);
    expect(record).toEqual(before);
  });
});

function at() {
  return { issuedAt: NOW, nextRefreshAt: NOW + 90_000, traceparent: TP, loggedIn: false };
}

describe('presentation gate (pure)', () => {
  const OPTIONS = {
    idpTimeoutMs: 2_000,
    lockMarginMs: 500,
    idleTimeoutMs: 60_000,
    busyRetryMs: 250,
  };
  const stored = (
    record: Partial<SessionRecord> = {},
    extra: Partial<StoredSession> = {},
  ): StoredSession => ({
    record: { ...active(), ...record },
    lastUsedAt: NOW - 1_000,
    inflight: undefined,
    ...extra,
  });
  const LOCK = NOW + 10_000;

  it('stops at an inactive session, and at a generation that already moved', () => {
    for (const status of ['REVOKED', 'IDLE', 'REAUTH_REQUIRED'] as const)
      expect(presentationGate(stored({ status }), { kind: 'due' }, LOCK, NOW, OPTIONS)).toEqual({
        kind: 'inactive',
      });
    expect(
      presentationGate(stored(), { kind: 'generation', generation: 3 }, LOCK, NOW, OPTIONS),
    ).toEqual({ kind: 'stale' });
  });

  it('a due claim: idle past the timeout, not due yet, or due', () => {
    expect(
      presentationGate(
        stored({}, { lastUsedAt: NOW - 60_001 }),
        { kind: 'due' },
        LOCK,
        NOW,
        OPTIONS,
      ),
    ).toEqual({ kind: 'idle' });
    expect(presentationGate(stored(), { kind: 'due' }, LOCK, NOW, OPTIONS)).toEqual({
      kind: 'not-due',
      dueAt: NOW + 15_000,
    });
    expect(
      presentationGate(stored({ nextRefreshAt: NOW }), { kind: 'due' }, LOCK, NOW, OPTIONS),
    ).toEqual({ kind: 'present', deadline: NOW + 2_000 });
    // An unfinished attempt of this generation is resolved now, even before the due time.
    const orphan = { generation: 4, deadline: NOW - 1, replica: 'r', attemptId: 'a' };
    expect(
      presentationGate(stored({}, { inflight: orphan }), { kind: 'due' }, LOCK, NOW, OPTIONS).kind,
    ).toBe('present');
    // A demand by generation is not subject to the due time or the idle timeout.
    expect(
      presentationGate(
        stored({}, { lastUsedAt: 0 }),
        { kind: 'generation', generation: 4 },
        LOCK,
        NOW,
        OPTIONS,
      ).kind,
    ).toBe('present');
  });

  it('presents only if the call ends a margin before the lock could lapse', () => {
    const fits = NOW + OPTIONS.idpTimeoutMs + OPTIONS.lockMarginMs;
    const demand = { kind: 'generation' as const, generation: 4 };
    expect(presentationGate(stored(), demand, fits, NOW, OPTIONS)).toEqual({
      kind: 'present',
      deadline: NOW + 2_000,
    });
    expect(presentationGate(stored(), demand, fits - 1, NOW, OPTIONS)).toEqual({
      kind: 'lock-too-short',
      retryAt: NOW + 250,
    });
  });
});
