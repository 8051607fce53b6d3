import { SignJWT } from 'jose';
import { describe, expect, it } from 'vitest';
import { accessTokenExpiry, jwtExpiry } from '../../broker/idp/jwt-expiry.js';

const key = new TextEncoder().encode('k'.repeat(32));

describe('access-token expiry', () => {
  it('takes the JWT exp when it is earlier than expires_in says', async () => {
    const jwt = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256' })
      .setExpirationTime(1_000)
      .sign(key);
    expect(jwtExpiry(jwt)).toBe(1_000_000);
    expect(accessTokenExpiry(jwt, 1_000_900)).toBe(1_000_000);
    expect(accessTokenExpiry(jwt, 999_000)).toBe(999_000);
  });

  it('falls back to expires_in for opaque tokens, JWTs without exp and garbage', async () => {
    const noExp = await new SignJWT({}).setProtectedHeader({ alg: 'HS256' }).sign(key);
    for (const token of ['opaque-token-value', noExp, 'a.b.c', '..'])
      expect(accessTokenExpiry(token, 42)).toBe(42);
  });
});
