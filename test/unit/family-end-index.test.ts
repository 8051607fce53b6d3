/**
 * The family-end count behind tb_broker_sessions_family_ending: which sessions it counts
 * (familyEndOf) and how the embedded store keeps it through commits. The Redis store's index is
 * exercised with a real redis-server in test/integration/family-end.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { enrolled, reauthRequired, revoked, rotated } from '../../broker/session-transitions.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import type { SessionRecord } from '../../broker/store/session-record.js';
import { familyEndOf } from '../../broker/store/session-store.js';

const NOW = 1_800_000_000_000;
const HOUR = 3_600_000;
const at = { now: NOW, traceparent: '' };
const tokens = (refreshExpiresAt: number | undefined) => ({
  accessToken: 'at-FAKE',
  tokenType: 'Bearer',
  accessExpiresAt: NOW + 60_000,
  refreshToken: 'rt-FAKE',
  refreshExpiresAt,
});
const seed = { refreshToken: 'rt-FAKE', login: undefined, enrolledBy: undefined };

function session(user: string, end: number | undefined, login = false): SessionRecord {
  return enrolled(
    { tenant: 'diku', user },
    'default',
    { ...seed, login: login ? { username: user, password: 'pw-FAKE' } : undefined },
    undefined,
    at,
    { tokens: tokens(end), nextRefreshAt: NOW + 30_000 },
  ).next;
}

describe('familyEndOf', () => {
  it('counts only ACTIVE sessions without a login whose family has a known end', () => {
    expect(familyEndOf(session('a', NOW + HOUR))).toBe(NOW + HOUR);
    expect(familyEndOf(session('b', undefined))).toBeUndefined();
    expect(familyEndOf(session('c', NOW + HOUR, true))).toBeUndefined();
    const dead = reauthRequired(session('d', NOW + HOUR), 'IDP_INVALID_GRANT', '').next;
    expect(familyEndOf(dead)).toBeUndefined();
    expect(familyEndOf(revoked(session('e', NOW + HOUR), '').next)).toBeUndefined();
  });
});

describe('MemorySessionStore.familyEndCounts', () => {
  it('counts per horizon, follows rotations and leaves ended or revoked sessions out', async () => {
    const store = new MemorySessionStore();
    const commitNew = (r: SessionRecord) =>
      store.commit({ next: r, dueAt: r.nextRefreshAt }, null, NOW);
    await commitNew(session('soon', NOW + 10 * 60_000));
    await commitNew(session('later', NOW + 5 * HOUR));
    await commitNew(session('login', NOW + 60_000, true));
    await commitNew(session('offline', undefined));
    const horizons = [15 * 60_000, HOUR, 24 * HOUR];
    expect(await store.familyEndCounts(NOW, horizons)).toEqual([1, 1, 2]);

    // A rotation that brings the end closer (Keycloak counts down) moves it into the horizon.
    const later = (await store.get({ tenant: 'diku', user: 'later' }))!.record;
    const closer = rotated(later, tokens(NOW + 30 * 60_000), {
      issuedAt: NOW,
      nextRefreshAt: NOW + 30_000,
      traceparent: '',
      loggedIn: false,
    });
    expect(await store.commit(closer, later.generation, NOW)).toBe(true);
    expect(await store.familyEndCounts(NOW, horizons)).toEqual([1, 2, 2]);

    const soon = (await store.get({ tenant: 'diku', user: 'soon' }))!.record;
    await store.commit(revoked(soon, ''), soon.generation, NOW);
    expect(await store.familyEndCounts(NOW, horizons)).toEqual([0, 1, 1]);
  });
});
