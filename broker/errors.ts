import { shapeRedactor } from './redaction.js';

/**
 * The broker's one error hierarchy. Every class has a stable `code` from BrokerErrorCode; `message`
 * is safe to show a client, while `detail` is for logs only. Neither ever contains a token value.
 * The gRPC edge maps every code to a status (grpc-server.ts): a code added here without a status
 * there fails to compile.
 */
export type BrokerErrorCode =
  | 'CONFIG_INVALID'
  | 'INVALID_ARGUMENT'
  | 'SESSION_NOT_FOUND'
  | 'REAUTH_REQUIRED'
  | 'SESSION_INACTIVE'
  | 'UNAVAILABLE'
  | 'SHUTTING_DOWN'
  | 'SEAL_INVALID'
  | 'SEALING_KEY_UNKNOWN'
  | 'LOCK_UNAVAILABLE'
  | 'IDP_INVALID_GRANT'
  | 'IDP_TOKEN_CONSUMED'
  | 'IDP_LOGIN_REJECTED'
  | 'IDP_INVALID_CLIENT'
  | 'BROKER_CLIENT_REJECTED'
  | 'IDP_UNAVAILABLE'
  | 'IDP_PROTOCOL_ERROR'
  | 'LOGIN_SECRET_UNREADABLE'
  | 'POLICY_INVALID'
  | 'UNAUTHENTICATED'
  | 'PERMISSION_DENIED'
  | 'RESOURCE_EXHAUSTED';

export abstract class BrokerError extends Error {
  abstract readonly code: BrokerErrorCode;
  /** Internal detail for logs; never sent to a client. */
  readonly detail: string | undefined;

  constructor(message: string, options?: { detail?: string; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.detail = options?.detail;
  }
}

/** The stable code of any thrown value: a BrokerError's own, else INTERNAL. */
export function errorCode(err: unknown): BrokerErrorCode | 'INTERNAL' {
  return err instanceof BrokerError ? err.code : 'INTERNAL';
}

/** How much of a bad value a message quotes: a hostile 1 MiB value must not come back whole. */
export const QUOTE_PREFIX_LENGTH = 64;

/**
 * `value` as JSON for a message, cut to its first QUOTE_PREFIX_LENGTH characters (with its length)
 * when longer.
 */
export function quotePrefix(value: string): string {
  if (value.length <= QUOTE_PREFIX_LENGTH) return JSON.stringify(value);
  return `${JSON.stringify(value.slice(0, QUOTE_PREFIX_LENGTH))}… (${value.length} characters)`;
}

/**
 * A configuration setting is missing or invalid; `setting` names it exactly. The problem may quote
 * a value (or a file's text in a parser message): it goes through the shape redaction first.
 */
export class ConfigError extends BrokerError {
  readonly code = 'CONFIG_INVALID';
  constructor(
    readonly setting: string,
    problem: string,
  ) {
    super(`${setting} ${shapeRedactor.redact(problem)}`);
  }
}

// --- requests ---

/** A request field is missing or malformed; `field` names it. */
export class InvalidArgumentError extends BrokerError {
  readonly code = 'INVALID_ARGUMENT';
  constructor(
    readonly field: string,
    problem: string,
  ) {
    super(`${field} ${problem}`);
  }
}

export class SessionNotFoundError extends BrokerError {
  readonly code = 'SESSION_NOT_FOUND';
  constructor(tenant: string, user: string) {
    super(`no session for tenant ${JSON.stringify(tenant)} user ${JSON.stringify(user)}`);
  }
}

/**
 * The IdP refused the broker's own client (invalid_client, unauthorized_client, unsupported_grant_type,
 * invalid_scope) during a call made for a client: the broker's configuration is wrong, not the
 * caller's credential. FAILED_PRECONDITION: retrying helps only once the operator fixed it.
 */
export class BrokerClientRejectedError extends BrokerError {
  readonly code = 'BROKER_CLIENT_REJECTED';
}

/** The session's token family is dead (invalid_grant); only a new enrollment helps. */
export class ReauthRequiredError extends BrokerError {
  readonly code = 'REAUTH_REQUIRED';
}

/** The session was revoked or went idle and holds no usable token. */
export class SessionInactiveError extends BrokerError {
  readonly code = 'SESSION_INACTIVE';
}

/** The rotation could not finish now (IdP down, lock contention, store down); retry later. */
export class UnavailableError extends BrokerError {
  readonly code = 'UNAVAILABLE';
  constructor(
    message: string,
    readonly retryAfterMs?: number,
    options?: { detail?: string; cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * A state write reached the Redis master but not yet the replicas TB_REDIS_MIN_REPLICAS asks for
 * (WAIT timed out): a failover could still lose it, so it does not count as stored. The rotator
 * retries it under the lock (the retry is idempotent: same generation, same sealed bytes).
 */
export class StateNotReplicatedError extends UnavailableError {
  constructor(
    readonly acknowledged: number,
    readonly required: number,
  ) {
    super('the state store did not confirm the write yet', undefined, {
      detail: `${acknowledged} of ${required} required replicas acknowledged (TB_REDIS_MIN_REPLICAS)`,
    });
  }
}

/** A per-stream bound was reached (subscriptions, or answers queued for a peer that stops reading). */
export class ResourceExhaustedError extends BrokerError {
  readonly code = 'RESOURCE_EXHAUSTED';
}

/** The broker is shutting down and takes no new work. */
export class ShuttingDownError extends BrokerError {
  readonly code = 'SHUTTING_DOWN';
}

// --- state and locks ---

/** A sealed record could not be opened: tampered data, or see SealingKeyUnknownError. */
export class SealError extends BrokerError {
  readonly code: 'SEAL_INVALID' | 'SEALING_KEY_UNKNOWN' = 'SEAL_INVALID';
  /** The key id the record names, when it names a plain one (for logs). */
  readonly kid: string | undefined;

  constructor(message: string, options?: { kid?: string; cause?: unknown }) {
    super(message, options);
    this.kid = options?.kid;
  }
}

/**
 * A sealed record names a key id no configured sealing key has (e.g. the old key was dropped
 * from TB_SEALING_KEYS before its records were rewritten): put the key back (after the
 * sealing one) and the records open again.
 */
export class SealingKeyUnknownError extends SealError {
  override readonly code = 'SEALING_KEY_UNKNOWN';
  declare readonly kid: string;

  constructor(kid: string) {
    super(`sealed record uses unknown key id "${kid}"`, { kid });
  }
}

/** Someone else holds the lock, or too few lock nodes answered for a quorum. */
export class LockUnavailableError extends BrokerError {
  readonly code = 'LOCK_UNAVAILABLE';
}

// --- identity providers (adapters classify every failure into one of these) ---

/** The refresh token is dead (invalid_grant): terminal, the session needs a new enrollment. */
export class IdpInvalidGrantError extends BrokerError {
  readonly code = 'IDP_INVALID_GRANT';
}

/** The IdP refused a system user's login (wrong password, unknown or blocked user): terminal. */
export class IdpLoginRejectedError extends BrokerError {
  readonly code = 'IDP_LOGIN_REJECTED';
}

/** The IdP rejected the broker's client credentials: a configuration error, loud and alerting. */
export class IdpInvalidClientError extends BrokerError {
  readonly code = 'IDP_INVALID_CLIENT';
}

/**
 * A failure worth retrying: 5xx, 429, timeout, connection error. `retryAfterMs` carries the IdP's
 * Retry-After when it sent one. `presented` is false only when the request surely never reached
 * the IdP (connection refused), so the refresh token was certainly not consumed. `answered` is
 * true when the IdP sent an HTTP answer (a 503, a 429): a known outcome, the token was not
 * consumed. Only presented and not answered leaves the outcome unknown.
 */
export class IdpTransientError extends BrokerError {
  readonly code = 'IDP_UNAVAILABLE';
  readonly answered: boolean;
  constructor(
    message: string,
    readonly retryAfterMs: number | undefined,
    readonly presented: boolean,
    options?: { detail?: string; cause?: unknown; answered?: boolean },
  ) {
    super(message, options);
    this.answered = options?.answered ?? false;
  }

  /** Sent, and no answer came back: the IdP may have consumed the token. */
  get outcomeUnknown(): boolean {
    return this.presented && !this.answered;
  }
}

/**
 * The IdP said (through introspection that is known to work for refresh tokens) that a token
 * whose answer was lost is no longer active: the lost answer consumed it. Not an invalid_grant:
 * the IdP never said that.
 */
export class IdpTokenConsumedError extends BrokerError {
  readonly code = 'IDP_TOKEN_CONSUMED';
}

/** The IdP answered with something that is not a valid token response. */
export class IdpProtocolError extends BrokerError {
  readonly code = 'IDP_PROTOCOL_ERROR';
}

/** A system user's password file could not be read; retried, since a mount may come back. */
export class LoginSecretError extends BrokerError {
  readonly code = 'LOGIN_SECRET_UNREADABLE';
}

// --- caller identity and access policy ---

/**
 * The access policy file is invalid. `line` is 1-based (0 when the file could not be read at all)
 * and `field` the path within the file (`rules[1].verbs[0]`), empty for a YAML syntax error.
 */
export class PolicyError extends BrokerError {
  readonly code = 'POLICY_INVALID';
  constructor(
    readonly source: string,
    readonly line: number,
    readonly field: string,
    problem: string,
  ) {
    super(`${source} line ${line}: ${field === '' ? '' : `${field} `}${problem}`);
  }
}

/** Why a caller's bearer token was refused; stable strings for audit lines and metrics. */
export type UnauthenticatedReason =
  | 'missing'
  | 'malformed'
  | 'expired'
  | 'not-yet-valid'
  | 'wrong-audience'
  | 'wrong-issuer'
  | 'unknown-key'
  | 'bad-algorithm'
  | 'bad-signature'
  | 'not-a-service-account'
  | 'keys-unavailable';

/** The call names no caller the broker can verify. The message never echoes the token. */
export class UnauthenticatedError extends BrokerError {
  readonly code = 'UNAUTHENTICATED';
  constructor(
    readonly reason: UnauthenticatedReason,
    message: string,
    options?: { detail?: string },
  ) {
    super(message, options);
  }
}

/** The caller is known but no policy rule allows this verb on this session. */
export class PermissionDeniedError extends BrokerError {
  readonly code = 'PERMISSION_DENIED';
}
