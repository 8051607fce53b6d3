/**
 * The broker's one error hierarchy. Every class has a stable `code`; `message` is safe to show a
 * client, while `detail` is for logs only. Neither ever contains a token value.
 */
export abstract class BrokerError extends Error {
  abstract readonly code: string;
  /** Internal detail for logs; never sent to a client. */
  readonly detail: string | undefined;

  constructor(message: string, options?: { detail?: string; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.detail = options?.detail;
  }
}

/** A configuration setting is missing or invalid; `setting` names it exactly. */
export class ConfigError extends BrokerError {
  readonly code = 'CONFIG_INVALID';
  constructor(
    readonly setting: string,
    problem: string,
  ) {
    super(`${setting} ${problem}`);
  }
}

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

/** A sealed record could not be opened: unknown key id or tampered data. */
export class SealError extends BrokerError {
  readonly code = 'SEAL_INVALID';
}

/** The broker is shutting down and takes no new work. */
export class ShuttingDownError extends BrokerError {
  readonly code = 'SHUTTING_DOWN';
}

// --- caller identity and access policy ---

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
