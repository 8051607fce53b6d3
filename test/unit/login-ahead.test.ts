import { describe, expect, it } from 'vitest';
import { dueWithLoginAhead, loginAheadAt } from '../../broker/rotation/rotation-policy.js';

const login = { username: 'sys', password: 'pw-FAKE' };
const family = (over: Partial<Parameters<typeof loginAheadAt>[0]> = {}) => ({
  login,
  refreshToken: 'rt',
  refreshExpiresAt: 100_000,
  loggedInAt: 0,
  ...over,
});

describe('loginAheadAt', () => {
  it('is the margin before the family end', () => {
    expect(loginAheadAt(family(), 30_000)).toBe(70_000);
  });

  it('never sooner than the margin after the last login, and not at all without room', () => {
    // Family of 50 s, margin 30 s: 30 s after the login (before the end).
    expect(loginAheadAt(family({ loggedInAt: 50_000 }), 30_000)).toBe(80_000);
    // Family shorter than the margin: no login ahead (it would log in at every rotation).
    expect(loginAheadAt(family({ loggedInAt: 80_000 }), 30_000)).toBeUndefined();
  });

  it('only for a login session with a refresh token whose end is known, and a margin', () => {
    expect(loginAheadAt(family({ login: undefined }), 30_000)).toBeUndefined();
    expect(loginAheadAt(family({ refreshToken: '' }), 30_000)).toBeUndefined();
    expect(loginAheadAt(family({ refreshExpiresAt: 0 }), 30_000)).toBeUndefined();
    expect(loginAheadAt(family(), 0)).toBeUndefined();
  });

  it('brings the due time forward, never back', () => {
    expect(dueWithLoginAhead(90_000, family(), 30_000)).toBe(70_000);
    expect(dueWithLoginAhead(60_000, family(), 30_000)).toBe(60_000);
    expect(dueWithLoginAhead(90_000, family({ login: undefined }), 30_000)).toBe(90_000);
  });
});
