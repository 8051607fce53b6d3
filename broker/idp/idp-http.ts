// The modules' default exports, read at call time: telemetry's HTTP instrumentation patches
// `request` on them, which named ESM imports of a builtin would not see.
import type { Agent as HttpAgent, ClientRequest, IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { brotliDecompressSync, gunzipSync, inflateSync } from 'node:zlib';
import { context, propagation, trace } from '@opentelemetry/api';

import { http, https } from '../../shared/node-http.js';
import { IdpTransientError } from '../errors.js';
import { shapeRedactor } from '../redaction.js';
/** What every IdP adapter shares: one HTTP call whose network failures are classified. */

/** The answer's headers: the part of fetch's Headers the adapters read. */
export interface AnswerHeaders {
  /** The value, repeated fields joined with ", "; null when absent. */
  get(name: string): string | null;
  getSetCookie(): string[];
}

export interface HttpAnswer {
  status: number;
  headers: AnswerHeaders;
  text: string;
}

export type JsonObject = Record<string, unknown>;

/** Failures that happen before a single byte of the request leaves: the token was not presented. */
const NOT_PRESENTED_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN']);

/**
 * Where requests go out: node:http(s) `request` with the agent of the URL's origin. Injectable so
 * tests can hand a connection that never connects; the timing and classification stay postOnce's.
 */
export interface IdpTransport {
  request(url: URL, options: { method: string; headers: Record<string, string> }): ClientRequest;
}

/**
 * Idle keep-alive sockets are closed after this (or 1 s before the server's `Keep-Alive:
 * timeout=N` hint, when that is sooner), as undici did, so a socket is rarely reused just as the
 * IdP closes it.
 */
const IDLE_SOCKET_MS = 4_000;
/** Per origin; a request beyond it waits for a socket, unsent, within TB_IDP_TIMEOUT_MS. */
const MAX_SOCKETS_PER_ORIGIN = 128;

/**
 * Keep-alive connections, one agent per IdP origin. TLS uses Node's default trust (the system
 * roots plus NODE_EXTRA_CA_CERTS), as fetch did.
 */
export function createKeepAliveTransport(
  /** TLS settings beyond Node's defaults (tests: a private CA); `idleMs` for tests. */
  settings: { ca?: string; idleMs?: number } = {},
): IdpTransport & { close(): void } {
  const { idleMs = IDLE_SOCKET_MS, ...tls } = settings;
  const agents = new Map<string, HttpAgent>();
  const agentOptions = {
    keepAlive: true,
    maxSockets: MAX_SOCKETS_PER_ORIGIN,
    maxFreeSockets: MAX_SOCKETS_PER_ORIGIN,
    // Only idle sockets: postOnce sets no 'timeout' listener, so a request waiting for its
    // answer is bounded by postOnce's timers, not by this.
    timeout: idleMs,
    scheduling: 'lifo' as const,
  };
  return {
    request(url, options) {
      const secure = url.protocol === 'https:';
      let agent = agents.get(url.origin);
      if (agent === undefined) {
        agent = secure
          ? new https.Agent({ ...agentOptions, ...tls })
          : new http.Agent(agentOptions);
        agents.set(url.origin, agent);
      }
      return (secure ? https.request : http.request)(url, { ...options, agent });
    },
    close() {
      for (const agent of agents.values()) agent.destroy();
      agents.clear();
    },
  };
}

/** The broker's connections to its IdPs (adapters share it unless a test injects another). */
export const defaultIdpTransport = createKeepAliveTransport();

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
  transport?: IdpTransport;
}

/**
 * Sends one POST and reads the whole answer. Every network failure becomes IdpTransientError;
 * `presented` is false only when the request surely never left (aborted or timed out before it
 * was handed to a connected socket, connection refused).
 *
 * The request (headers, then the body with its exact Content-Length) is written in full at once;
 * the moment it is "sent" is when its socket is connected (TCP, and for https the TLS handshake
 * done) or, for a reused keep-alive socket, when that socket is assigned. Before it, `timeoutMs`
 * aborts a request that never reached the IdP; after it, only `answerWaitMs` or the caller's
 * signal (lock lost) ends the wait. A reused socket the IdP closed just then fails with
 * ECONNRESET: the request may have been read, so it counts as presented and is never resent.
 * A request without a body is treated as sent from the start. Redirects are answers, never
 * followed: a followed 307/308 would resend the token to wherever it points.
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
  // A string body goes out in one write with the headers (node:http joins them); its length is
  // its UTF-8 byte count.
  let sentHeaders =
    body === undefined
      ? headers
      : { ...headers, 'content-length': String(Buffer.byteLength(body, 'utf8')) };
  // Traced (the caller's idp.* span is recording): the request carries its traceparent, and the
  // span gets the answer's HTTP attributes, so no per-request HTTP span is needed (README,
  // TB_TRACE_CLIENT_SPANS).
  const span = trace.getActiveSpan();
  const traced = span?.isRecording() === true ? span : undefined;
  if (traced) {
    sentHeaders = { ...sentHeaders };
    propagation.inject(context.active(), sentHeaders);
  }
  const exchange = send(options.transport ?? defaultIdpTransport, url, 'POST', sentHeaders, body);
  if (body === undefined) exchange.sent = true;
  let timedOut: 'send' | 'answer' | undefined;
  const sendTimer = setTimeout(() => {
    if (exchange.sent) return;
    timedOut = 'send';
    exchange.cancel();
  }, timeoutMs);
  const answerTimer = setTimeout(() => {
    timedOut = 'answer';
    exchange.cancel();
  }, answerWaitMs);
  const onAbort = (): void => exchange.cancel();
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    const answer = await exchange.answer;
    if (traced) {
      const { hostname, port, protocol } = parsedUrl(url);
      traced.setAttributes({
        'http.request.method': 'POST',
        'http.response.status_code': answer.status,
        'server.address': hostname,
        'server.port': port === '' ? (protocol === 'https:' ? 443 : 80) : Number(port),
      });
    }
    return answer;
  } catch (err) {
    const { sent } = exchange;
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
    signal.removeEventListener('abort', onAbort);
  }
}

interface Exchange {
  answer: Promise<HttpAnswer>;
  /** True once the request may have reached the server (see postOnce). */
  sent: boolean;
  /** Ends the exchange: `answer` rejects (unless it already settled) and the socket is closed. */
  cancel(): void;
}

/** Starts one request and reads its whole answer. */
function send(
  transport: IdpTransport,
  url: string,
  method: string,
  headers: Record<string, string>,
  body: string | undefined,
): Exchange {
  let request: ClientRequest | undefined;
  let fail: (err: Error) => void = () => undefined;
  const exchange: Exchange = {
    sent: false,
    answer: new Promise<HttpAnswer>((resolve, reject) => {
      let settled = false;
      fail = (err) => {
        if (settled) return;
        settled = true;
        reject(err);
        request?.destroy();
      };
      const req = transport.request(parsedUrl(url), { method, headers });
      request = req;
      req.on('error', fail);
      req.on('socket', (socket: Socket) => {
        if (req.reusedSocket || isConnected(socket)) {
          exchange.sent = true;
          return;
        }
        // A fresh socket: the request is written once it connects (after the TLS handshake).
        const connected = (): void => {
          exchange.sent = true;
        };
        socket.once('encrypted' in socket ? 'secureConnect' : 'connect', connected);
      });
      req.on('response', (res: IncomingMessage) => {
        exchange.sent = true;
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('error', fail);
        res.on('close', () => {
          if (!res.complete)
            fail(Object.assign(new Error('the answer was cut short'), { code: 'ECONNRESET' }));
        });
        res.on('end', () => {
          if (settled) return;
          try {
            const text = decodeBody(Buffer.concat(chunks), res.headers['content-encoding']);
            settled = true;
            resolve({ status: res.statusCode ?? 0, headers: new NodeAnswerHeaders(res), text });
          } catch (err) {
            fail(err as Error);
          }
        });
      });
      if (body === undefined) req.end();
      else req.end(body, 'utf8');
    }),
    cancel: () => fail(new Error('the request was cancelled')),
  };
  return exchange;
}

/** Parsed endpoint URLs: a broker has a handful (from its configuration), parsed once each. */
const parsedUrls = new Map<string, URL>();
const MAX_PARSED_URLS = 256;

function parsedUrl(url: string): URL {
  let parsed = parsedUrls.get(url);
  if (parsed === undefined) {
    parsed = new URL(url);
    if (parsedUrls.size >= MAX_PARSED_URLS) parsedUrls.clear();
    parsedUrls.set(url, parsed);
  }
  return parsed;
}

/** A socket handed over already connected (and, for TLS, past its handshake). */
function isConnected(socket: Socket): boolean {
  if (socket.connecting || socket.remoteAddress === undefined) return false;
  if (!('encrypted' in socket)) return true;
  const protocol = (socket as TLSSocket).getProtocol();
  return protocol !== null && protocol !== 'unknown';
}

/** As fetch's text(): decoded per Content-Encoding (servers may compress unasked), a BOM dropped. */
function decodeBody(raw: Buffer, encoding: string | undefined): string {
  let bytes = raw;
  for (const coding of (encoding ?? '')
    .toLowerCase()
    .split(',')
    .map((c) => c.trim())
    .reverse()) {
    if (coding === 'gzip' || coding === 'x-gzip') bytes = gunzipSync(bytes);
    else if (coding === 'deflate') bytes = inflateSync(bytes);
    else if (coding === 'br') bytes = brotliDecompressSync(bytes);
    else if (coding !== '' && coding !== 'identity') {
      throw new Error(`the answer has an unsupported Content-Encoding`);
    }
  }
  const text = bytes.toString('utf8');
  return text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
}

/** fetch's Headers reading, over node's parsed headers (names already lower case). */
class NodeAnswerHeaders implements AnswerHeaders {
  readonly #headers: IncomingMessage['headers'];

  constructor(res: IncomingMessage) {
    this.#headers = res.headers;
  }

  get(name: string): string | null {
    const value = this.#headers[name.toLowerCase()];
    if (value === undefined) return null;
    return Array.isArray(value) ? value.join(', ') : value;
  }

  getSetCookie(): string[] {
    return [...(this.#headers['set-cookie'] ?? [])];
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
