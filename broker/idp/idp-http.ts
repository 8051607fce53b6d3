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
  /**
   * Bounds connecting and handing the request over (TB_IDP_TIMEOUT_MS). A call that has not
   * handed its body to the connection by then is aborted: the IdP never saw the token.
   */
  timeoutMs: number;
  /**
   * Bounds the whole call once the request is sent (TB_IDP_ANSWER_WAIT_MS; default `timeoutMs`).
   * A presented refresh is not abandoned at `timeoutMs`: the answer is the only copy of the new
   * refresh token, so the broker waits for it (the lock is extended meanwhile).
   */
  answerWaitMs?: number;
  signal: AbortSignal;
  fetch: typeof fetch;
}

/**
 * Sends one POST and reads the whole answer. Every network failure becomes IdpTransientError;
 * `presented` is false only when the request surely never left (aborted or timed out before the
 * body was handed to the connection, connection refused).
 *
 * The body travels as a one-chunk stream with its exact Content-Length, so the moment fetch pulls
 * it (connected, headers written) is visible: before it, `timeoutMs` aborts a request that never
 * reached the IdP; after it, only `answerWaitMs` or the caller's signal (lock lost) ends the wait.
 * A request without a body gives no such moment: it is treated as sent from the start.
 */
export async function postOnce(
  url: string,
  headers: Record<string, string>,
  body: string | undefined,
  options: SendOptions,
): Promise<HttpAnswer> {
  const { where, timeoutMs, signal } = options;
  const answerWaitMs = Math.max(options.answerWaitMs ?? timeoutMs, timeoutMs);
  if (signal.aborted) {
    throw new IdpTransientError(`${where}: aborted before the request was sent`, undefined, false);
  }
  let sent = body === undefined;
  const bytes = body === undefined ? undefined : Buffer.from(body, 'utf8');
  const stream =
    bytes === undefined
      ? undefined
      : new ReadableStream<Uint8Array>(
          {
            pull(controller) {
              sent = true;
              controller.enqueue(bytes);
              controller.close();
            },
          },
          // No read ahead: pull() runs only when fetch writes the body to a connected socket.
          { highWaterMark: 0 },
        );
  const local = new AbortController();
  let timedOut: 'send' | 'answer' | undefined;
  const sendTimer = setTimeout(() => {
    if (sent) return;
    timedOut = 'send';
    local.abort();
  }, timeoutMs);
  const answerTimer = setTimeout(() => {
    timedOut = 'answer';
    local.abort();
  }, answerWaitMs);
  try {
    const response = await options.fetch(url, {
      method: 'POST',
      headers:
        bytes === undefined ? headers : { ...headers, 'content-length': String(bytes.length) },
      ...(stream === undefined ? {} : { body: stream, duplex: 'half' as const }),
      // A followed 307/308 would resend the token to wherever the redirect points.
      redirect: 'manual',
      signal: AbortSignal.any([signal, local.signal]),
    });
    sent = true;
    return { status: response.status, headers: response.headers, text: await response.text() };
  } catch (err) {
    if (signal.aborted) {
      throw new IdpTransientError(
        sent
          ? `${where}: aborted by the caller after the request was sent`
          : `${where}: aborted by the caller before the request was sent`,
        undefined,
        sent,
      );
    }
    if (timedOut === 'send') {
      throw new IdpTransientError(
        `${where}: could not connect and send the request within ${timeoutMs} ms`,
        undefined,
        false,
      );
    }
    if (timedOut === 'answer') {
      throw new IdpTransientError(`${where}: no answer within ${answerWaitMs} ms`, undefined, true);
    }
    const codes = errorCodes(err);
    const presented =
      sent && (codes.length === 0 || !codes.every((code) => NOT_PRESENTED_CODES.has(code)));
    const reason = codes.length === 0 ? 'request failed' : `request failed (${codes.join(', ')})`;
    throw new IdpTransientError(`${where}: ${reason}`, undefined, presented, {
      detail: errorChain(err),
      cause: err,
    });
  } finally {
    clearTimeout(sendTimer);
    clearTimeout(answerTimer);
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
