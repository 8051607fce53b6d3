import { decodeJwt } from 'jose';

/**
 * The `exp` of an access token that is a JWT, in epoch ms; undefined for opaque tokens. Not a
 * verification: it only keeps the broker from believing expires_in when the token itself says it
 * ends sooner (an IdP computes `exp` from whole seconds, so it can end up to a second before
 * request time + expires_in, and clocks differ).
 */
export function jwtExpiry(token: string): number | undefined {
  if (token.split('.').length !== 3) return undefined;
  try {
    const { exp } = decodeJwt(token);
    return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/** The earlier of the expiry from expires_in and the JWT's own `exp`, when it has one. */
export function accessTokenExpiry(token: string, fromExpiresIn: number): number {
  const exp = jwtExpiry(token);
  return exp === undefined ? fromExpiresIn : Math.min(fromExpiresIn, exp);
}
