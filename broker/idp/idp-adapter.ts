import { BrokerError } from '../errors.js';

/** What an identity provider returned for one refresh. Times are epoch milliseconds. */
export interface TokenSet {
  accessToken: string;
  tokenType: string;
  /** When the access token expires (from expires_in: access tokens may be opaque). */
  accessExpiresAt: number;
  /** The rotated refresh token, or undefined when the IdP kept the old one. */
  refreshToken?: string | undefined;
  /** When the refresh token expires, when the IdP says (refresh_expires_in). */
  refreshExpiresAt?: number | undefined;
}

/**
 * One identity provider. Implementations classify every failure into the IdP error classes below;
 * they never put a token value into an error, log line or span.
 */
export interface IdpAdapter {
  readonly name: string;
  /** Presents the refresh token once. `signal` aborts the call (lock about to lapse, shutdown). */
  refresh(refreshToken: string, signal: AbortSignal): Promise<TokenSet>;
  /** Revokes the refresh token (RFC 7009) when the IdP supports it; a no-op otherwise. */
  revoke(refreshToken: string, signal: AbortSignal): Promise<void>;
}

/** The refresh token is dead (invalid_grant): terminal, the session needs a new enrollment. */
export class IdpInvalidGrantError extends BrokerError {
  readonly code = 'IDP_INVALID_GRANT';
}

/** The IdP rejected the broker's client credentials: a configuration error, loud and alerting. */
export class IdpInvalidClientError extends BrokerError {
  readonly code = 'IDP_INVALID_CLIENT';
}

/**
 * A failure worth retrying: 5xx, 429, timeout, connection error. `retryAfterMs` carries the IdP's
 * Retry-After when it sent one. `presented` is false only when the request surely never reached
 * the IdP (connection refused), so the refresh token was certainly not consumed.
 */
export class IdpTransientError extends BrokerError {
  readonly code = 'IDP_UNAVAILABLE';
  constructor(
    message: string,
    readonly retryAfterMs: number | undefined,
    readonly presented: boolean,
    options?: { detail?: string; cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The IdP answered with something that is not a valid token response. */
export class IdpProtocolError extends BrokerError {
  readonly code = 'IDP_PROTOCOL_ERROR';
}
