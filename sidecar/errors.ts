/**
 * The sidecar's one error hierarchy. Every class has a stable `code` and the HTTP status a module
 * sees; `message` is safe to show a client and never contains a token value.
 */
export abstract class SidecarError extends Error {
  abstract readonly code: string;
  abstract readonly status: number;

  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }

  /** Extra response headers (Retry-After, Allow). */
  headers(): Record<string, string> {
    return {};
  }
}

/** A configuration variable is missing or invalid; `setting` names it exactly. */
export class ConfigError extends SidecarError {
  readonly code = 'CONFIG_INVALID';
  readonly status = 500;
  constructor(
    readonly setting: string,
    problem: string,
  ) {
    super(`${setting} ${problem}`);
  }
}

export class MissingHeaderError extends SidecarError {
  readonly code = 'MISSING_HEADER';
  readonly status = 400;
  constructor() {
    super('token reads need the request header "X-Token-Broker: true"');
  }
}

/** A path segment or query parameter is malformed; the message names it. */
export class InvalidParameterError extends SidecarError {
  readonly code = 'INVALID_PARAMETER';
  readonly status = 400;
  constructor(
    readonly parameter: string,
    problem: string,
  ) {
    super(`${parameter} ${problem}`);
  }
}

/** The request came through a proxy (as GCE's metadata server, such requests are refused). */
export class ForwardedRequestError extends SidecarError {
  readonly code = 'FORWARDED_REQUEST';
  readonly status = 403;
  constructor(readonly header: string) {
    super(
      `requests must come straight from the module, not through a proxy (header ${JSON.stringify(header)})`,
    );
  }
}

/**
 * The Host header names something other than the loopback: a DNS-rebinding page in the pod's
 * network, or a proxy, would send it. 421 Misdirected Request: this server is not that host.
 */
export class HostNotAllowedError extends SidecarError {
  readonly code = 'HOST_NOT_ALLOWED';
  readonly status = 421;
  constructor(host: string | undefined, allowed: string) {
    super(
      host === undefined
        ? `requests must carry a Host header naming the loopback (${allowed})`
        : `Host ${JSON.stringify(host.slice(0, 100))} does not name this sidecar; use ${allowed}`,
    );
  }
}

export class RouteNotFoundError extends SidecarError {
  readonly code = 'NOT_FOUND';
  readonly status = 404;
  constructor(path: string) {
    super(
      `no route ${JSON.stringify(path.slice(0, 100))}; try GET /v1/tokens/{tenant}/{user}, /healthz, /readyz or /metrics`,
    );
  }
}

export class MethodNotAllowedError extends SidecarError {
  readonly code = 'METHOD_NOT_ALLOWED';
  readonly status = 405;
  constructor(method: string) {
    super(`method ${JSON.stringify(method.slice(0, 20))} is not allowed here; use GET`);
  }
  override headers(): Record<string, string> {
    return { allow: 'GET' };
  }
}

/** The user is outside TB_SIDECAR_ALLOWED_USERS: this sidecar never asks the broker for it. */
export class UserNotAllowedError extends SidecarError {
  readonly code = 'USER_NOT_ALLOWED';
  readonly status = 403;
  constructor(tenant: string) {
    super(
      `this sidecar does not serve users of tenant ${JSON.stringify(tenant)} or this user (TB_SIDECAR_ALLOWED_USERS)`,
    );
  }
}

/** The sidecar already holds TB_SIDECAR_MAX_USERS users; an unread one is dropped in time. */
export class TooManyUsersError extends SidecarError {
  readonly code = 'TOO_MANY_USERS';
  readonly status = 429;
  constructor(readonly max: number) {
    super(`this sidecar already holds ${max} users (TB_SIDECAR_MAX_USERS); retry later`);
  }

  override headers(): Record<string, string> {
    return { 'Retry-After': '60' };
  }
}

export class SessionNotFoundError extends SidecarError {
  readonly code = 'SESSION_NOT_FOUND';
  readonly status = 404;
  constructor(tenant: string, user: string) {
    super(
      `the broker has no session for tenant ${JSON.stringify(tenant)} user ${JSON.stringify(user)}; enroll the user first`,
    );
  }
}

/** The token family is dead: the module must stop and have the user log in again. */
export class ReauthRequiredError extends SidecarError {
  readonly code = 'REAUTH_REQUIRED';
  readonly status = 409;
  constructor() {
    super(
      'the identity provider rejected the session (invalid_grant): the user must log in again and be re-enrolled',
    );
  }
}

export class SessionRevokedError extends SidecarError {
  readonly code = 'SESSION_REVOKED';
  readonly status = 410;
  constructor() {
    super('the session was revoked; enroll the user again to get tokens');
  }
}

/** No token fresher than the safety skew right now; a retry later may succeed. */
export class TokenUnavailableError extends SidecarError {
  readonly code = 'TOKEN_UNAVAILABLE';
  readonly status = 503;
  constructor(
    message: string,
    readonly retryAfterSeconds = 1,
  ) {
    super(message);
  }
  override headers(): Record<string, string> {
    return { 'retry-after': String(this.retryAfterSeconds) };
  }
}

/** `min_generation` was not reached within the wait. */
export class WaitTimeoutError extends SidecarError {
  readonly code = 'WAIT_TIMEOUT';
  readonly status = 504;
  constructor(minGeneration: number, current: number, waitedMs: number) {
    super(
      `generation ${minGeneration} did not arrive within ${waitedMs} ms (current generation ${current}); retry, or raise wait`,
    );
  }
}

/** A bug in the sidecar; the detail goes to the log only. */
export class InternalError extends SidecarError {
  readonly code = 'INTERNAL';
  readonly status = 500;
  constructor() {
    super('internal error in the sidecar; retry, and report it if it persists');
  }
}
