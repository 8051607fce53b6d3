import {
  IdpInvalidClientError,
  IdpInvalidGrantError,
  IdpProtocolError,
  IdpTransientError,
} from '../errors.js';
import { accessTokenExpiry, jwtExpiry } from './jwt-expiry.js';
import {
  type IdpAdapter,
  type IdpContext,
  type RevokeOutcome,
  type SubjectToken,
  type TokenSet,
} from './idp-adapter.js';
import {
  displayUrl,
  errorChain,
  isHttpUrl,
  parseJsonObject,
  parseRetryAfter,
  postOnce,
  defaultIdpTransport,
  type IdpTransport,
  type HttpAnswer,
  type JsonObject,
} from './idp-http.js';
import { Redactor } from '../redaction.js';

export type ClientAuthMethod = 'client_secret_basic' | 'client_secret_post' | 'none';

export interface OAuth2AdapterOptions {
  name: string;
  /** When absent, found through OIDC discovery on `issuer`. */
  tokenEndpoint?: string;
  issuer?: string;
  /** When absent, taken from discovery; with neither, revoke is a no-op. */
  revocationEndpoint?: string;
  /** RFC 7662 endpoint; when absent, taken from discovery; with neither, isActive cannot tell. */
  introspectionEndpoint?: string;
  clientId: string;
  clientSecret?: string;
  authMethod: ClientAuthMethod;
  scope?: string;
  /**
   * RFC 8693 `requested_token_type` of an exchange enrollment; default the refresh-token type,
   * since the broker needs a family of its own.
   */
  exchangeTokenType?: string;
  /** Bounds connecting and sending; the whole call, for calls that consume nothing. */
  timeoutMs: number;
  /** Bounds waiting for the token endpoint's answer once sent (default: 60 s). */
  answerWaitMs?: number;
  now?: () => number;
  /** Where requests go out (default: the shared keep-alive connections); tests inject one. */
  transport?: IdpTransport;
}

/**
 * RFC 6749 makes expires_in only RECOMMENDED, and opaque access tokens cannot be inspected. Without
 * it we assume a short life, so the broker refreshes early rather than hands out a dead token.
 */
const DEFAULT_EXPIRES_IN_S = 300;
const MAX_DESCRIPTION_CHARS = 200;
/** Revoke's answer (RevokeResponse.idp_revoke_problem) when the IdP has nowhere to revoke. */
export const NO_REVOCATION_ENDPOINT = 'no revocation endpoint';

export const TOKEN_EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';
export const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
export const REFRESH_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:refresh_token';

const CLIENT_CONFIG_ERRORS = new Set([
  'invalid_client',
  'unauthorized_client',
  'unsupported_grant_type',
  'invalid_scope',
]);
const TRANSIENT_ERRORS = new Set(['server_error', 'temporarily_unavailable']);
/** Only codes from this list reach a message: an unknown code is server text and goes to detail. */
const KNOWN_ERRORS = new Set([
  'invalid_grant',
  'invalid_request',
  'invalid_target',
  'unsupported_token_type',
  ...CLIENT_CONFIG_ERRORS,
  ...TRANSIENT_ERRORS,
]);

interface Discovered {
  tokenEndpoint: string;
  revocationEndpoint: string | undefined;
  introspectionEndpoint: string | undefined;
}

/**
 * A generic OAuth2 client for the refresh grant (RFC 6749 §6), revocation (RFC 7009) and token
 * exchange (RFC 8693) as an enrollment.
 */
export class OAuth2Adapter implements IdpAdapter {
  readonly name: string;
  private readonly tokenEndpoint: string | undefined;
  private readonly issuer: string | undefined;
  private readonly revocationEndpoint: string | undefined;
  private readonly introspectionEndpoint: string | undefined;
  private readonly clientId: string;
  private readonly clientSecret: string | undefined;
  private readonly authMethod: ClientAuthMethod;
  private readonly scope: string | undefined;
  private readonly exchangeTokenType: string;
  private readonly timeoutMs: number;
  private readonly answerWaitMs: number;
  private readonly now: () => number;
  private readonly transport: IdpTransport;
  private readonly label: string;
  /** Knows the client secret and the Basic credentials built from it. */
  private readonly redactor: Redactor;
  private discovery: Promise<Discovered> | undefined;

  /** `options` are already valid: config.ts checks every IdP setting at start-up. */
  constructor(options: OAuth2AdapterOptions) {
    this.name = options.name;
    this.tokenEndpoint = options.tokenEndpoint;
    this.issuer = options.issuer?.replace(/\/+$/, '');
    this.revocationEndpoint = options.revocationEndpoint;
    this.introspectionEndpoint = options.introspectionEndpoint;
    this.clientId = options.clientId;
    this.authMethod = options.authMethod;
    this.clientSecret = options.authMethod === 'none' ? undefined : options.clientSecret;
    this.scope = options.scope;
    this.exchangeTokenType = options.exchangeTokenType ?? REFRESH_TOKEN_TYPE;
    this.timeoutMs = options.timeoutMs;
    this.answerWaitMs = Math.max(options.answerWaitMs ?? 60_000, options.timeoutMs);
    this.now = options.now ?? Date.now;
    this.transport = options.transport ?? defaultIdpTransport;
    this.label = `IdP ${JSON.stringify(this.name)}`;
    this.redactor = new Redactor([this.clientSecret, this.basicCredentials()]);
  }

  /** The session context is unused: an OAuth2 refresh token names its user and client itself. */
  async refresh(
    refreshToken: string,
    signal: AbortSignal,
    _context?: IdpContext,
  ): Promise<TokenSet> {
    const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: refreshToken });
    return this.requestTokens(form, refreshToken, signal);
  }

  /**
   * RFC 8693: trades the user's token for a new family issued to the broker's client, so the
   * user's own refresh token is never presented. An answer without a refresh token is refused:
   * the broker could not keep the session alive.
   */
  async exchange(
    subject: SubjectToken,
    signal: AbortSignal,
    _context?: IdpContext,
  ): Promise<TokenSet> {
    const form = new URLSearchParams({
      grant_type: TOKEN_EXCHANGE_GRANT,
      subject_token: subject.token,
      subject_token_type: subject.tokenType || ACCESS_TOKEN_TYPE,
      requested_token_type: this.exchangeTokenType,
    });
    const tokens = await this.requestTokens(form, subject.token, signal);
    if (tokens.refreshToken === undefined) {
      throw new IdpProtocolError(
        `${this.label}: token exchange answered without a refresh_token; the broker needs one ` +
          `(requested_token_type ${this.exchangeTokenType})`,
      );
    }
    return tokens;
  }

  /** One grant at the token endpoint; `sentToken` is masked out of any error detail. */
  private async requestTokens(
    form: URLSearchParams,
    sentToken: string,
    signal: AbortSignal,
  ): Promise<TokenSet> {
    const endpoint = this.tokenEndpoint ?? (await this.discover(signal)).tokenEndpoint;
    const where = `${this.label}: token endpoint ${displayUrl(endpoint)}`;
    if (this.scope !== undefined) form.set('scope', this.scope);

    // Read before sending, so every expiry we compute errs early.
    const sentAt = this.now();
    // A sent grant may consume a token: its answer is awaited, not abandoned at timeoutMs.
    const answer = await this.post(endpoint, form, where, signal, this.answerWaitMs);
    if (answer.status !== 200) throw this.errorAnswer(answer, where, sentToken);

    const body = parseJsonObject(answer.text);
    if (body === undefined) {
      throw new IdpProtocolError(
        `${where} answered HTTP 200 with a body that is not a JSON object`,
      );
    }
    // Some IdPs (GitHub among them) report errors with status 200.
    if (body.access_token === undefined && typeof body.error === 'string') {
      throw this.errorAnswer(answer, where, sentToken);
    }
    return readTokenSet(body, sentAt, where);
  }

  async revoke(
    refreshToken: string,
    signal: AbortSignal,
    _context?: IdpContext,
  ): Promise<RevokeOutcome> {
    const endpoint = await this.findRevocationEndpoint(signal);
    if (endpoint === undefined) return { revoked: false, reason: NO_REVOCATION_ENDPOINT };
    const where = `${this.label}: revocation endpoint ${displayUrl(endpoint)}`;
    const form = new URLSearchParams({ token: refreshToken, token_type_hint: 'refresh_token' });

    const answer = await this.post(endpoint, form, where, signal);
    if (answer.status >= 200 && answer.status < 300) return { revoked: true };
    const error = this.errorAnswer(answer, where, refreshToken);
    // RFC 7009 answers 200 for a token that is already invalid, so invalid_grant here is off-spec.
    if (error instanceof IdpInvalidGrantError) {
      throw new IdpProtocolError(error.message, { detail: error.detail });
    }
    throw error;
  }

  async revocationProblem(signal: AbortSignal): Promise<string | undefined> {
    return (await this.findRevocationEndpoint(signal)) === undefined
      ? `${NO_REVOCATION_ENDPOINT} (neither TB_IDP_REVOCATION_ENDPOINT nor revocation_endpoint in ${this.issuer === undefined ? 'a discovery document: no issuer is set' : 'the discovery document'})`
      : undefined;
  }

  /** The configured revocation endpoint, else the discovered one; undefined when neither. */
  private async findRevocationEndpoint(signal: AbortSignal): Promise<string | undefined> {
    return (
      this.revocationEndpoint ??
      (this.issuer === undefined ? undefined : (await this.discover(signal)).revocationEndpoint)
    );
  }

  async isActive(
    refreshToken: string,
    signal: AbortSignal,
    _context?: IdpContext,
  ): Promise<boolean | undefined> {
    const endpoint =
      this.introspectionEndpoint ??
      (this.issuer === undefined ? undefined : (await this.discover(signal)).introspectionEndpoint);
    if (endpoint === undefined) return undefined;
    const where = `${this.label}: introspection endpoint ${displayUrl(endpoint)}`;
    const form = new URLSearchParams({ token: refreshToken, token_type_hint: 'refresh_token' });
    const answer = await this.post(endpoint, form, where, signal);
    if (answer.status !== 200) throw this.errorAnswer(answer, where, refreshToken);
    const active = parseJsonObject(answer.text)?.active;
    if (typeof active !== 'boolean')
      throw new IdpProtocolError(`${where} answered HTTP 200 without a boolean "active"`);
    return active;
  }

  /** Sends one form POST with client authentication; every network failure becomes transient. */
  private post(
    endpoint: string,
    form: URLSearchParams,
    where: string,
    signal: AbortSignal,
    answerWaitMs = this.timeoutMs,
  ): Promise<HttpAnswer> {
    const headers: Record<string, string> = {
      accept: 'application/json',
      'content-type': 'application/x-www-form-urlencoded',
    };
    const basic = this.basicCredentials();
    if (basic !== undefined) {
      headers.authorization = `Basic ${basic}`;
    } else {
      form.set('client_id', this.clientId);
      if (this.authMethod === 'client_secret_post')
        form.set('client_secret', this.clientSecret ?? '');
    }
    return postOnce(endpoint, headers, form.toString(), {
      where,
      timeoutMs: this.timeoutMs,
      answerWaitMs,
      signal,
      transport: this.transport,
    });
  }

  /** RFC 6749 §2.3.1: each part is form-urlencoded before the two are joined and base64'd. */
  private basicCredentials(): string | undefined {
    if (this.authMethod !== 'client_secret_basic') return undefined;
    const pair = `${formEncode(this.clientId)}:${formEncode(this.clientSecret ?? '')}`;
    return Buffer.from(pair, 'utf8').toString('base64');
  }

  /** Classifies a non-success answer. Only known error codes and the truncated description leave. */
  private errorAnswer(answer: HttpAnswer, where: string, sentToken: string): Error {
    const retryAfterMs = parseRetryAfter(answer.headers.get('retry-after'), this.now());
    const body = parseJsonObject(answer.text);
    const code = typeof body?.error === 'string' ? body.error : undefined;
    const knownCode = code !== undefined && KNOWN_ERRORS.has(code) ? code : undefined;
    const message = `${where} answered HTTP ${answer.status}${knownCode === undefined ? '' : ` ${knownCode}`}`;
    const detail = describeError(body, code !== knownCode, this.redactor.with(sentToken));
    const options = detail === undefined ? undefined : { detail };

    const { status } = answer;
    if (status === 408 || status === 429 || status >= 500) {
      return new IdpTransientError(message, retryAfterMs, true, { ...options, answered: true });
    }
    if (code === 'invalid_grant') return new IdpInvalidGrantError(message, options);
    if (code !== undefined && CLIENT_CONFIG_ERRORS.has(code)) {
      return new IdpInvalidClientError(message, options);
    }
    if (code !== undefined && TRANSIENT_ERRORS.has(code)) {
      return new IdpTransientError(message, retryAfterMs, true, { ...options, answered: true });
    }
    // A bare 401 from a token endpoint can only be about the client's own credentials.
    if (code === undefined && status === 401) return new IdpInvalidClientError(message, options);
    return new IdpProtocolError(message, options);
  }

  /** One discovery in flight for all callers; a failure is forgotten so the next call retries. */
  private discover(signal: AbortSignal): Promise<Discovered> {
    this.discovery ??= this.fetchDiscovery().catch((err: unknown) => {
      this.discovery = undefined;
      throw err;
    });
    const pending = this.discovery;
    return new Promise<Discovered>((resolve, reject) => {
      const onAbort = (): void =>
        reject(new IdpTransientError(`${this.label}: aborted during discovery`, undefined, false));
      void pending
        .then(resolve, reject)
        .finally(() => signal.removeEventListener('abort', onAbort));
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Any discovery failure is transient and the token is never presented: nothing was sent. */
  private async fetchDiscovery(): Promise<Discovered> {
    const url = `${this.issuer ?? ''}/.well-known/openid-configuration`;
    const where = `${this.label}: discovery ${displayUrl(url)}`;
    const failed = (problem: string, retryAfterMs?: number, cause?: unknown): IdpTransientError =>
      new IdpTransientError(`${where} ${problem}`, retryAfterMs, false, {
        ...(cause === undefined ? {} : { detail: errorChain(cause), cause }),
      });

    const timeout = AbortSignal.timeout(this.timeoutMs);
    let answer: HttpAnswer;
    try {
      // Global fetch, not the token transport: discovery is rare, sends nothing secret, and
      // follows redirects as it always did.
      const response = await fetch(url, {
        headers: { accept: 'application/json' },
        signal: timeout,
      });
      answer = { status: response.status, headers: response.headers, text: await response.text() };
    } catch (err) {
      throw timeout.aborted
        ? failed(`gave no answer within ${this.timeoutMs} ms`)
        : failed('failed', undefined, err);
    }
    if (answer.status !== 200) {
      throw failed(
        `answered HTTP ${answer.status}`,
        parseRetryAfter(answer.headers.get('retry-after'), this.now()),
      );
    }
    const doc = parseJsonObject(answer.text);
    if (doc === undefined) throw failed('answered with a body that is not a JSON object');
    const tokenEndpoint = doc.token_endpoint;
    if (typeof tokenEndpoint !== 'string' || !isHttpUrl(tokenEndpoint)) {
      throw failed('has no http(s) token_endpoint');
    }
    const revocationEndpoint = doc.revocation_endpoint;
    if (
      revocationEndpoint !== undefined &&
      (typeof revocationEndpoint !== 'string' || !isHttpUrl(revocationEndpoint))
    ) {
      throw failed('has a revocation_endpoint that is not an http(s) URL');
    }
    const introspectionEndpoint = doc.introspection_endpoint;
    if (
      introspectionEndpoint !== undefined &&
      (typeof introspectionEndpoint !== 'string' || !isHttpUrl(introspectionEndpoint))
    ) {
      throw failed('has an introspection_endpoint that is not an http(s) URL');
    }
    return { tokenEndpoint, revocationEndpoint, introspectionEndpoint };
  }
}

function readTokenSet(body: JsonObject, sentAt: number, where: string): TokenSet {
  const invalid = (problem: string): IdpProtocolError =>
    new IdpProtocolError(`${where} answered HTTP 200 but ${problem}`);

  const accessToken = body.access_token;
  if (typeof accessToken !== 'string' || accessToken === '') {
    throw invalid('access_token is missing or not a string');
  }
  const tokenType = body.token_type ?? 'Bearer';
  if (typeof tokenType !== 'string' || tokenType === '')
    throw invalid('token_type is not a string');
  const refreshToken = body.refresh_token ?? undefined;
  if (refreshToken !== undefined && (typeof refreshToken !== 'string' || refreshToken === '')) {
    throw invalid('refresh_token is not a non-empty string');
  }
  const expiresIn = readSeconds(body.expires_in);
  if (expiresIn === null) throw invalid('expires_in is not a non-negative number');
  const refreshExpiresIn = readSeconds(body.refresh_expires_in);
  if (refreshExpiresIn === null) throw invalid('refresh_expires_in is not a non-negative number');

  return {
    accessToken,
    tokenType,
    accessExpiresAt: accessTokenExpiry(
      accessToken,
      sentAt + Math.floor((expiresIn ?? DEFAULT_EXPIRES_IN_S) * 1000),
    ),
    refreshToken,
    refreshExpiresAt: refreshExpiry(refreshToken, refreshExpiresIn, sentAt),
  };
}

/**
 * When the family ends at the latest: from `refresh_expires_in` (Keycloak counts it down to the
 * SSO session maximum), else from the refresh token's own `exp` when it is a JWT. Keycloak sends
 * refresh_expires_in 0 for offline tokens, which do not expire on a clock.
 */
function refreshExpiry(
  refreshToken: string | undefined,
  refreshExpiresIn: number | undefined,
  sentAt: number,
): number | undefined {
  if (refreshExpiresIn === 0) return undefined;
  if (refreshExpiresIn !== undefined) return sentAt + Math.floor(refreshExpiresIn * 1000);
  return refreshToken === undefined ? undefined : jwtExpiry(refreshToken);
}

/** Seconds from a number or numeric string; undefined when absent, null when malformed. */
function readSeconds(value: unknown): number | undefined | null {
  if (value === undefined || value === null) return undefined;
  const seconds =
    typeof value === 'number'
      ? value
      : typeof value === 'string' && /^\d+(\.\d+)?$/.test(value.trim())
        ? Number(value)
        : NaN;
  return Number.isFinite(seconds) && seconds >= 0 ? seconds : null;
}

/**
 * The description (and an unknown error code) for logs: redacted (the client secret, the token
 * sent, anything credential-shaped), then truncated.
 */
function describeError(
  body: JsonObject | undefined,
  withCode: boolean,
  redactor: Redactor,
): string | undefined {
  const clean = (text: string): string =>
    redactor.redact(text, { maxChars: MAX_DESCRIPTION_CHARS });
  const parts: string[] = [];
  if (withCode && typeof body?.error === 'string') parts.push(`error: ${clean(body.error)}`);
  if (typeof body?.error_description === 'string') {
    parts.push(`error_description: ${clean(body.error_description)}`);
  }
  return parts.length === 0 ? undefined : parts.join('; ');
}

function formEncode(value: string): string {
  return new URLSearchParams({ v: value }).toString().slice('v='.length);
}
