import { IdpTransientError } from '../errors.js';
import { shapeRedactor } from '../redaction.js';
/** What every IdP adapter shares: one HTTP call whose network failures are classified. */

export interface HttpAnswer {
  status: number;
  headers: Headers;
  text: string;
}

export type JsonObject = Record<string, unknown>;

/** Failures that happen before a single byte of the request leaves: the token was not presented. */
const NOT_PRESENTED_CODES = new Set([
  'ECONNREFUSED',
  'ENOTFOUND',
  'EAI_AGAIN',
  'UND_ERR_CONNECT_TIMEOUT',
]);

export interface SendOptions {
  /** Names the IdP and endpoint in messages (never a token). */
  where: string;
  timeoutMs: number;
  signal: AbortSignal;
  fetch: typeof fetch;
}

/**
 * Sends one POST and reads the whole answer. Every network failure becomes IdpTransientError;
 * `presented` is false only when the request surely never left (aborted first, connection refused).
 */
export async function postOnce(
  url: string,
  headers: Record<string, string>,
  body: string | undefined,
  options: SendOptions,
): Promise<HttpAnswer> {
  const { where, timeoutMs, signal } = options;
  if (signal.aborted) {
    throw new IdpTransientError(`${where}: aborted before the request was sent`, undefined, false);
  }
  const timeout = AbortSignal.timeout(timeoutMs);
  try {
    const response = await options.fetch(url, {
      method: 'POST',
      headers,
      ...(body === undefined ? {} : { body }),
      // A followed 307/308 would resend the token to wherever the redirect points.
      redirect: 'manual',
      signal: AbortSignal.any([signal, timeout]),
    });
    return { status: response.status, headers: response.headers, text: await response.text() };
  } catch (err) {
    if (signal.aborted) {
      throw new IdpTransientError(
        `${where}: aborted by the caller after the request was sent`,
        undefined,
        true,
      );
    }
    if (timeout.aborted) {
      throw new IdpTransientError(`${where}: no answer within ${timeoutMs} ms`, undefined, true);
    }
    const codes = errorCodes(err);
    const presented = codes.length === 0 || !codes.every((code) => NOT_PRESENTED_CODES.has(code));
    const reason = codes.length === 0 ? 'request failed' : `request failed (${codes.join(', ')})`;
    throw new IdpTransientError(`${where}: ${reason}`, undefined, presented, {
      detail: errorChain(err),
      cause: err,
    });
  }
}

/** Retry-After as delta-seconds or an HTTP-date, measured against the injected clock. */
export function parseRetryAfter(value: string | null, now: number): number | undefined {
  if (value === null) return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  const at = Date.parse(trimmed);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/** Never surfaces the parser's message: V8 quotes the start of the input, which may be a token. */
export function parseJsonObject(text: string): JsonObject | undefined {
  try {
    const value: unknown = JSON.parse(text);
    return typeof value === 'object' && value !== null && !Array.isArray(value)
      ? (value as JsonObject)
      : undefined;
  } catch {
    return undefined;
  }
}

/** Every `code` in the cause chain, including each branch of an AggregateError (happy eyeballs). */
export function errorCodes(err: unknown, depth = 0): string[] {
  if (typeof err !== 'object' || err === null || depth > 8) return [];
  const codes: string[] = [];
  const { code, cause } = err as { code?: unknown; cause?: unknown };
  if (typeof code === 'string') codes.push(code);
  if (err instanceof AggregateError) {
    for (const inner of err.errors) codes.push(...errorCodes(inner, depth + 1));
  }
  codes.push(...errorCodes(cause, depth + 1));
  return [...new Set(codes)];
}

/** Network error messages (addresses, codes) for logs, redacted: a proxy's text may quote a header. */
export function errorChain(err: unknown): string {
  const messages: string[] = [];
  for (let at = err, depth = 0; at instanceof Error && depth < 8; at = at.cause, depth += 1) {
    messages.push(at.message);
  }
  return shapeRedactor.redact(messages.join(' <- '));
}

/** Origin and path only: the query may carry secrets and credentials in the authority. */
export function displayUrl(url: string): string {
  const parsed = new URL(url);
  return `${parsed.origin}${parsed.pathname}`;
}

export function isHttpUrl(value: string): boolean {
  if (!URL.canParse(value)) return false;
  const { protocol } = new URL(value);
  return protocol === 'https:' || protocol === 'http:';
}
