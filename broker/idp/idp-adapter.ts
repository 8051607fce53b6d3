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

/** The session a call is made for: FOLIO names the tenant in a header (`x-okapi-tenant`). */
export interface IdpContext {
  tenant: string;
  user: string;
}

/** A system user's credentials, resolved just before a login; never stored by an adapter. */
export interface LoginCredentials {
  username: string;
  password: string;
}

/** The token an RFC 8693 exchange starts from (the user's access token, by default). */
export interface SubjectToken {
  token: string;
  /** An RFC 8693 token type URI, e.g. urn:ietf:params:oauth:token-type:access_token. */
  tokenType: string;
}

/** What a revocation did at the IdP: `reason` says why the token was not revoked there. */
export type RevokeOutcome = { revoked: true } | { revoked: false; reason: string };

/**
 * One identity provider. Implementations classify every failure into the IdP error classes below;
 * they never put a token value or a password into an error, log line or span.
 */
export interface IdpAdapter {
  readonly name: string;
  /** Presents the refresh token once. `signal` aborts the call (lock about to lapse, shutdown). */
  refresh(refreshToken: string, signal: AbortSignal, context: IdpContext): Promise<TokenSet>;
  /**
   * Revokes the refresh token (RFC 7009, FOLIO logout) when the IdP supports it. Without a
   * revocation endpoint it sends nothing and answers `{ revoked: false, reason }`; an IdP error
   * is thrown, classified as usual.
   */
  revoke(refreshToken: string, signal: AbortSignal, context: IdpContext): Promise<RevokeOutcome>;
  /**
   * Why this IdP cannot revoke refresh tokens (no revocation endpoint configured or discovered),
   * undefined when it can; checked once at start-up for a warning. Absent: it always can.
   */
  revocationProblem?(signal: AbortSignal): Promise<string | undefined>;
  /**
   * Logs a system user in, starting a new token family (FOLIO `login-with-expiry`). Absent when
   * the IdP offers no such login. A refusal of the credentials is IdpLoginRejectedError.
   */
  login?(
    credentials: LoginCredentials,
    signal: AbortSignal,
    context: IdpContext,
  ): Promise<TokenSet>;
  /**
   * Exchanges a subject token for a new token family the broker owns (RFC 8693). Absent when the
   * IdP offers no exchange. The result always carries a refresh token.
   */
  exchange?(subject: SubjectToken, signal: AbortSignal, context: IdpContext): Promise<TokenSet>;
  /**
   * Whether the refresh token is still unused and valid (RFC 7662 introspection), asked before
   * presenting a token whose last presentation has no known outcome (its replica died mid-call).
   * Undefined when the IdP cannot tell; absent when the IdP offers no introspection.
   */
  isActive?(
    refreshToken: string,
    signal: AbortSignal,
    context: IdpContext,
  ): Promise<boolean | undefined>;
}
