import {
  IdpInvalidGrantError,
  IdpLoginRejectedError,
  IdpProtocolError,
  IdpTransientError,
} from '../errors.js';
import {
  type IdpAdapter,
  type IdpContext,
  type LoginCredentials,
  type RevokeOutcome,
  type TokenSet,
} from './idp-adapter.js';
import {
  displayUrl,
  parseJsonObject,
  parseRetryAfter,
  postOnce,
  defaultIdpTransport,
  type IdpTransport,
  type HttpAnswer,
  type JsonObject,
} from './idp-http.js';
import { Redactor } from '../redaction.js';

/**
 * FOLIO's own refresh-token rotation (mod-login behind the Okapi or Kong gateway), as FOLIO's RTR
 * guide describes it: tokens travel only in cookies, `/authn/refresh` takes the refresh token in
 * the `folioRefreshToken` cookie and answers with two Set-Cookie headers, and the body carries the
 * expirations in ISO 8601. Every request names the tenant in `x-okapi-tenant`.
 */
export interface FolioAdapterOptions {
  name: string;
  /** The gateway's base URL (Okapi or Kong), e.g. https://folio-okapi.example.org. */
  baseUrl: string;
  timeoutMs: number;
  /** Bounds waiting for the answer of a refresh or login once sent (default 60 s). */
  answerWaitMs?: number;
  now?: () => number;
  /** Where requests go out (default: the shared keep-alive connections); tests inject one. */
  transport?: IdpTransport;
}

export const ACCESS_TOKEN_COOKIE = 'folioAccessToken';
export const REFRESH_TOKEN_COOKIE = 'folioRefreshToken';
const TENANT_HEADER = 'x-okapi-tenant';
/**
 * Used only when neither the body nor the cookie gives the access token's expiry (FOLIO always
 * sends both). Short on purpose: refreshing early is cheap, serving a dead token is not.
 */
const DEFAULT_ACCESS_TTL_S = 60;

/** FOLIO error codes safe to put in a message; anything else is server text and goes to detail. */
const KNOWN_LOGIN_CODES = new Set([
  'username.incorrect',
  'password.incorrect',
  'password.incorrect.warn.user',
  'password.incorrect.block.user',
  'user.blocked',
]);

/** RFC 6265 cookie-octet: what a token must consist of to travel in a Cookie header unharmed. */
const COOKIE_VALUE = /^[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+$/;
const HEADER_VALUE = /^[\x21-\x7e]+$/;

export class FolioAdapter implements IdpAdapter {
  readonly name: string;
  private readonly baseUrl: string;
  private readonly timeoutMs: number;
  private readonly answerWaitMs: number;
  private readonly now: () => number;
  private readonly transport: IdpTransport;
  private readonly label: string;

  /** `options` are already valid: config.ts checks every IdP setting at start-up. */
  constructor(options: FolioAdapterOptions) {
    this.name = options.name;
    this.baseUrl = options.baseUrl.replace(/\/+$/, '');
    this.timeoutMs = options.timeoutMs;
    this.answerWaitMs = Math.max(options.answerWaitMs ?? 60_000, options.timeoutMs);
    this.now = options.now ?? Date.now;
    this.transport = options.transport ?? defaultIdpTransport;
    this.label = `FOLIO ${JSON.stringify(this.name)}`;
  }

  /**
   * Presents the refresh token once. mod-login answers 422 when mod-authtoken refused it
   * (invalid, expired or already used) and the gateway 401/403 for an expired token: terminal.
   * Presenting it again would count as reuse and revoke every token of the user.
   */
  async refresh(refreshToken: string, signal: AbortSignal, context: IdpContext): Promise<TokenSet> {
    const { url, where } = this.endpoint('/authn/refresh');
    if (!COOKIE_VALUE.test(refreshToken))
      throw new IdpInvalidGrantError(`${where}: the refresh token is not a valid cookie value`);
    const headers = {
      ...this.headers(context, where),
      cookie: `${REFRESH_TOKEN_COOKIE}=${refreshToken}`,
    };
    const sentAt = this.now();
    // No body: the request counts as sent at once, so only the answer wait bounds it.
    const answer = await this.post(url, headers, undefined, where, signal, this.answerWaitMs);
    if (answer.status === 200 || answer.status === 201)
      return readTokens(answer, sentAt, where, [refreshToken]);
    throw this.failure(answer, where, [refreshToken], (message, options) =>
      answer.status === 400 || answer.status === 404
        ? new IdpProtocolError(message, options)
        : new IdpInvalidGrantError(
            `${message}: the refresh token is invalid, expired or already used`,
            options,
          ),
    );
  }

  /** `POST /authn/login-with-expiry`: a new family for a system user. */
  async login(
    credentials: LoginCredentials,
    signal: AbortSignal,
    context: IdpContext,
  ): Promise<TokenSet> {
    const { url, where } = this.endpoint('/authn/login-with-expiry');
    const headers = { ...this.headers(context, where), 'content-type': 'application/json' };
    const body = JSON.stringify({ username: credentials.username, password: credentials.password });
    const sentAt = this.now();
    const answer = await this.post(url, headers, body, where, signal, this.answerWaitMs);
    const secrets = [credentials.password];
    if (answer.status === 200 || answer.status === 201)
      return readTokens(answer, sentAt, where, secrets);
    throw this.failure(answer, where, secrets, (message, options) => {
      // 404: no module serves login-with-expiry for this tenant (a legacy token tenant).
      if (answer.status === 404) return new IdpProtocolError(message, options);
      const code = folioErrorCode(parseJsonObject(answer.text));
      const known = code !== undefined && KNOWN_LOGIN_CODES.has(code) ? ` ${code}` : '';
      return new IdpLoginRejectedError(`${message}${known}: login refused`, options);
    });
  }

  /** `POST /authn/logout` with the refresh token: only that token (its session) is invalidated. */
  async revoke(
    refreshToken: string,
    signal: AbortSignal,
    context: IdpContext,
  ): Promise<RevokeOutcome> {
    const { url, where } = this.endpoint('/authn/logout');
    if (!COOKIE_VALUE.test(refreshToken))
      return { revoked: false, reason: 'the refresh token is not a valid cookie value' };
    const headers = {
      ...this.headers(context, where),
      cookie: `${REFRESH_TOKEN_COOKIE}=${refreshToken}`,
    };
    const answer = await this.post(url, headers, undefined, where, signal);
    // A token already invalid is revoked enough (as RFC 7009 answers 200 for it).
    if ((answer.status >= 200 && answer.status < 300) || [401, 403, 422].includes(answer.status))
      return { revoked: true };
    throw this.failure(
      answer,
      where,
      [refreshToken],
      (message, options) => new IdpProtocolError(message, options),
    );
  }

  private endpoint(path: string): { url: string; where: string } {
    const url = `${this.baseUrl}${path}`;
    return { url, where: `${this.label}: ${displayUrl(url)}` };
  }

  private headers(context: IdpContext, where: string): Record<string, string> {
    if (!HEADER_VALUE.test(context.tenant))
      throw new IdpProtocolError(`${where}: the tenant id cannot be sent in ${TENANT_HEADER}`);
    return { accept: 'application/json', [TENANT_HEADER]: context.tenant };
  }

  private post(
    url: string,
    headers: Record<string, string>,
    body: string | undefined,
    where: string,
    signal: AbortSignal,
    answerWaitMs = this.timeoutMs,
  ): Promise<HttpAnswer> {
    return postOnce(url, headers, body, {
      where,
      timeoutMs: this.timeoutMs,
      answerWaitMs,
      signal,
      transport: this.transport,
    });
  }

  /** 408, 429 and 5xx are transient (Retry-After honoured); the rest is up to `classify`. */
  private failure(
    answer: HttpAnswer,
    where: string,
    secrets: readonly string[],
    classify: (message: string, options: { detail?: string }) => Error,
  ): Error {
    const message = `${where} answered HTTP ${answer.status}`;
    const text = answer.text.trim();
    const redactor = new Redactor(secrets);
    const options = text === '' ? {} : { detail: redactor.redact(text, { maxChars: 200 }) };
    const { status } = answer;
    if (status === 408 || status === 429 || status >= 500) {
      const retryAfterMs = parseRetryAfter(answer.headers.get('retry-after'), this.now());
      return new IdpTransientError(message, retryAfterMs, true, { ...options, answered: true });
    }
    return classify(message, options);
  }
}

/** One parsed Set-Cookie header (RFC 6265 §5.2). Times are epoch ms. */
export interface SetCookie {
  name: string;
  value: string;
  maxAgeSeconds: number | undefined;
  expiresAt: number | undefined;
  path: string | undefined;
  attributes: ReadonlyMap<string, string>;
}

/** Parses one Set-Cookie header value; undefined when it has no `name=value` pair. */
export function parseSetCookie(header: string): SetCookie | undefined {
  const [pair = '', ...rest] = header.split(';');
  const eq = pair.indexOf('=');
  if (eq <= 0) return undefined;
  const name = pair.slice(0, eq).trim();
  let value = pair.slice(eq + 1).trim();
  if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) value = value.slice(1, -1);
  const attributes = new Map<string, string>();
  for (const part of rest) {
    const at = part.indexOf('=');
    const key = (at < 0 ? part : part.slice(0, at)).trim().toLowerCase();
    if (key !== '') attributes.set(key, at < 0 ? '' : part.slice(at + 1).trim());
  }
  const maxAge = attributes.get('max-age');
  const expires = attributes.get('expires');
  const expiresAt = expires === undefined ? NaN : Date.parse(expires);
  return {
    name,
    value,
    maxAgeSeconds: maxAge !== undefined && /^-?\d+$/.test(maxAge) ? Number(maxAge) : undefined,
    expiresAt: Number.isNaN(expiresAt) ? undefined : expiresAt,
    path: attributes.get('path'),
    attributes,
  };
}

/**
 * The new pair from the Set-Cookie headers; expiries from the JSON body (mod-login's
 * `accessTokenExpiration`/`refreshTokenExpiration`, or mod-users-bl's `tokenExpiration` object),
 * else from each cookie's Max-Age (counted from when the request was sent, so it errs early), else
 * its Expires.
 */
function readTokens(
  answer: HttpAnswer,
  sentAt: number,
  where: string,
  secrets: readonly string[],
): TokenSet {
  const invalid = (problem: string): IdpProtocolError =>
    new IdpProtocolError(`${where} answered HTTP ${answer.status} but ${problem}`);
  const cookies = new Map<string, SetCookie>();
  for (const header of answer.headers.getSetCookie()) {
    const cookie = parseSetCookie(header);
    if (cookie) cookies.set(cookie.name, cookie);
  }
  const access = cookies.get(ACCESS_TOKEN_COOKIE);
  const refresh = cookies.get(REFRESH_TOKEN_COOKIE);
  if (!access?.value) throw invalid(`set no ${ACCESS_TOKEN_COOKIE} cookie`);
  // Without the rotated refresh token the next refresh would present a used one: reuse.
  if (!refresh?.value) throw invalid(`set no ${REFRESH_TOKEN_COOKIE} cookie`);
  if (secrets.includes(refresh.value)) throw invalid('returned the refresh token it was given');

  const body = parseJsonObject(answer.text) ?? {};
  const nested = body.tokenExpiration;
  const expirations: JsonObject =
    typeof nested === 'object' && nested !== null && !Array.isArray(nested)
      ? (nested as JsonObject)
      : body;
  const accessExpiresAt =
    expiryOf(expirations.accessTokenExpiration, access, sentAt) ??
    sentAt + DEFAULT_ACCESS_TTL_S * 1000;
  return {
    accessToken: access.value,
    tokenType: 'Bearer',
    accessExpiresAt,
    refreshToken: refresh.value,
    refreshExpiresAt: expiryOf(expirations.refreshTokenExpiration, refresh, sentAt),
  };
}

function expiryOf(fromBody: unknown, cookie: SetCookie, sentAt: number): number | undefined {
  if (typeof fromBody === 'string') {
    const at = Date.parse(fromBody);
    if (!Number.isNaN(at)) return at;
  }
  if (cookie.maxAgeSeconds !== undefined) return sentAt + cookie.maxAgeSeconds * 1000;
  return cookie.expiresAt;
}

/** The first `code` of FOLIO's `{ errors: [{ message, code }] }`. */
function folioErrorCode(body: JsonObject | undefined): string | undefined {
  const errors = body?.errors;
  if (!Array.isArray(errors)) return undefined;
  const first: unknown = errors[0];
  if (typeof first !== 'object' || first === null) return undefined;
  const code = (first as JsonObject).code;
  return typeof code === 'string' ? code : undefined;
}
