import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Span } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { ATTR, userHash } from '../shared/telemetry/span-attributes.js';
import { markFailed, tracer } from '../shared/telemetry/spans.js';
import { spanContextOf } from '../shared/telemetry/trace-context.js';
import {
  ForwardedRequestError,
  HostNotAllowedError,
  InternalError,
  MethodNotAllowedError,
  MissingHeaderError,
  RouteNotFoundError,
  SidecarError,
} from './errors.js';
import type { SidecarMetrics } from './metrics.js';
import { decideRead, type ReadDecision } from './read-policy.js';
import type { SessionRef } from '../shared/session-ref.js';
import { TOKEN_PATH_PREFIX, TokenRequestCache, type TokenRequest } from './token-request.js';
import type { TokenState, TokenStore, UserEntry } from './token-store.js';

/** While a module waits for a newer generation, a refused or lost Refresh is retried this often. */
const REFRESH_RECHECK_MS = 1_000;

/** What the HTTP API needs from the rest of the sidecar. */
export interface TokenSessions {
  /** The user's entry, subscribing on first use; records the read for the idle timeout. */
  read(ref: SessionRef): UserEntry;
  /** The module reported `generation` as rejected: have the broker rotate (coalesced). */
  requestRefresh(entry: UserEntry, generation: number): void;
  /**
   * The held token is within its skew and no newer generation came on the streams: ask a broker
   * replica for the current state (GetToken; coalesced and rate-limited per user).
   */
  fetchCurrent(entry: UserEntry): void;
}

export interface Readiness {
  ready: boolean;
  body: Record<string, unknown>;
}

export interface HttpApiDeps {
  store: TokenStore;
  sessions: TokenSessions;
  readiness: () => Readiness;
  metrics: SidecarMetrics;
  log: Logger;
  maxWaitMs: number;
  /** The most users held at once (TB_SIDECAR_MAX_USERS): bounds the parsed-URL cache. */
  maxUsers?: number;
  clock?: () => number;
}

const JSON_TYPE = 'application/json';

/**
 * Request headers a proxy, load balancer or CDN adds or reads. A request carrying any of them did
 * not come straight from a process in the pod, so it is refused (README.md, "Sidecar").
 */
const PROXY_HEADERS = [
  'forwarded',
  'x-forwarded-for',
  'x-forwarded-host',
  'x-forwarded-proto',
  'x-forwarded-port',
  'x-forwarded-prefix',
  'x-forwarded-server',
  'x-real-ip',
  'via',
  'true-client-ip',
  'x-client-ip',
  'x-cluster-client-ip',
  'cf-connecting-ip',
  'fastly-client-ip',
  'x-original-forwarded-for',
  'x-envoy-external-address',
  'x-original-url',
  'x-rewrite-url',
  'x-original-host',
] as const;

const PROXY_HEADER_SET: ReadonlySet<string> = new Set(PROXY_HEADERS);

/** Where the server listens: a TCP port on 127.0.0.1, or a Unix socket. */
export type ListenAddress = { port: number } | { socket: string };

/**
 * The Host values that name this sidecar: the loopback, with or without the bound port (lower
 * case; the match lowercases what it gets). On a Unix socket only "localhost", or none.
 */
function loopbackHosts(address: ListenAddress): ReadonlySet<string> {
  if ('socket' in address) return new Set(['localhost']);
  const names = ['127.0.0.1', 'localhost', '[::1]'];
  return new Set(names.flatMap((name) => [name, `${name}:${address.port}`]));
}

/** A token read being answered: when it started, and its `sidecar.read` span. */
interface ReadInFlight {
  started: number;
  span: Span;
}

/**
 * The localhost API. A read of a fresh token is answered synchronously from memory; only reads
 * that must wait (first token, newer generation) take the slower async path.
 */
export class SidecarHttpApi {
  private closing = false;
  private readonly clock: () => number;
  private readonly parsedUrls: TokenRequestCache;
  /**
   * The JSON answer per state, rebuilt when `expires_in` changes (once a second). A string, not a
   * Buffer: node:http sends a string body in one write with the headers.
   */
  private readonly bodies = new WeakMap<
    TokenState,
    { expiresIn: number; body: string; length: number }
  >();
  /** Until `listening` says where, no Host is accepted (no request can arrive before either). */
  private hosts: ReadonlySet<string> = new Set();
  private noHostAllowed = false;

  constructor(private readonly deps: HttpApiDeps) {
    this.clock = deps.clock ?? Date.now;
    this.parsedUrls = new TokenRequestCache(deps.maxWaitMs, deps.maxUsers ?? 0);
  }

  /** The server is bound: from now on only Host values naming that address are served. */
  listening(address: ListenAddress): void {
    this.hosts = loopbackHosts(address);
    this.noHostAllowed = 'socket' in address;
  }

  /**
   * Refuses a request that did not come straight from a process in the pod: one whose Host names
   * anything but the loopback (DNS rebinding), or that carries a proxy header.
   */
  private checkOrigin(headers: IncomingMessage['headers']): void {
    const host = headers.host;
    if (
      host === undefined
        ? !this.noHostAllowed
        : !this.hosts.has(host) && !this.hosts.has(host.toLowerCase())
    )
      throw new HostNotAllowedError(host, [...this.hosts].join(', '));
    // A request has a handful of headers: looking each up is cheaper than probing for all 19.
    for (const name in headers)
      if (PROXY_HEADER_SET.has(name)) throw new ForwardedRequestError(name);
  }

  /** Shutdown: waiting reads answer now with what they have. */
  close(): void {
    this.closing = true;
    this.deps.store.wakeAll();
  }

  readonly handle = (req: IncomingMessage, res: ServerResponse): void => {
    const url = req.url ?? '/';
    const q = url.indexOf('?');
    const path = q < 0 ? url : url.slice(0, q);
    if (path.startsWith(TOKEN_PATH_PREFIX)) {
      this.tokenRead(req, res, path.slice(TOKEN_PATH_PREFIX.length), q < 0 ? '' : url.slice(q + 1));
      return;
    }
    try {
      this.checkOrigin(req.headers);
      if (path !== '/healthz' && path !== '/readyz' && path !== '/metrics')
        throw new RouteNotFoundError(path);
      if (req.method !== 'GET') throw new MethodNotAllowedError(req.method ?? '');
      if (path === '/healthz') return sendJson(res, 200, { status: 'ok' });
      if (path === '/readyz') {
        const readiness = this.deps.readiness();
        return sendJson(res, readiness.ready ? 200 : 503, readiness.body);
      }
      void this.sendMetrics(res, path);
    } catch (err) {
      this.sendError(res, err);
    }
  };

  private async sendMetrics(res: ServerResponse, path: string): Promise<void> {
    try {
      const text = await this.deps.metrics.exposition();
      if (!text) throw new RouteNotFoundError(path);
      res.writeHead(200, { 'content-type': text.contentType });
      res.end(text.body);
    } catch (err) {
      this.sendError(res, err);
    }
  }

  /** Answers malformed HTTP (as an oversized request line) with JSON instead of a bare status. */
  readonly clientError = (err: Error & { code?: string }, socket: Socket): void => {
    if (!socket.writable || err.code === 'ECONNRESET') {
      socket.destroy();
      return;
    }
    const tooLarge = err.code === 'HPE_HEADER_OVERFLOW';
    const body = JSON.stringify({
      error: tooLarge
        ? { code: 'REQUEST_TOO_LARGE', message: 'the request line and headers exceed 16 KiB' }
        : { code: 'BAD_REQUEST', message: 'the request is not valid HTTP/1.1' },
    });
    socket.end(
      `HTTP/1.1 ${tooLarge ? '431 Request Header Fields Too Large' : '400 Bad Request'}\r\n` +
        `content-type: ${JSON_TYPE}\r\ncontent-length: ${Buffer.byteLength(body)}\r\n` +
        `connection: close\r\n\r\n${body}`,
    );
  };

  private tokenRead(req: IncomingMessage, res: ServerResponse, rest: string, query: string): void {
    const read: ReadInFlight = {
      started: performance.now(),
      span: tracer.startSpan('sidecar.read'),
    };
    let request: TokenRequest;
    let entry: UserEntry;
    let decision: ReadDecision;
    try {
      if (req.method !== 'GET') throw new MethodNotAllowedError(req.method ?? '');
      const headers = req.headers;
      this.checkOrigin(headers);
      const flag = headers['x-token-broker'];
      if (typeof flag !== 'string' || flag.toLowerCase() !== 'true') throw new MissingHeaderError();
      request = this.parsedUrls.get(rest, query);
      if (read.span.isRecording())
        read.span.setAttributes({
          [ATTR.tenant]: request.tenant,
          [ATTR.userHash]: userHash(request.user),
          'tb.min_generation': request.minGeneration,
        });
      entry = this.deps.sessions.read(request);
      decision = decideRead(
        this.deps.store,
        entry,
        request.minGeneration,
        request.waitMs === 0 || this.closing,
        0,
      );
    } catch (err) {
      this.sendError(res, err, read);
      return;
    }
    if (decision.kind === 'serve') this.sendToken(req, res, entry, read);
    else if (decision.kind === 'fail') this.sendError(res, decision.error, read);
    else void this.waitAndAnswer(req, res, request, entry, decision, read);
  }

  private async waitAndAnswer(
    req: IncomingMessage,
    res: ServerResponse,
    request: TokenRequest,
    entry: UserEntry,
    first: ReadDecision,
    read: ReadInFlight,
  ): Promise<void> {
    const started = read.started;
    let gone = false;
    res.once('close', () => (gone = true));
    const deadline = started + request.waitMs;
    let decision = first;
    while (decision.kind === 'wait') {
      if (decision.refresh) this.deps.sessions.requestRefresh(entry, request.minGeneration - 1);
      if (decision.fetch) this.deps.sessions.fetchCurrent(entry);
      const remaining = deadline - performance.now();
      await this.deps.store.waitForChange(
        entry,
        decision.refresh || decision.fetch ? Math.min(remaining, REFRESH_RECHECK_MS) : remaining,
      );
      if (gone) {
        this.deps.metrics.tokenRead('CLIENT_CLOSED', (performance.now() - started) / 1000);
        read.span.setAttribute(ATTR.outcome, 'CLIENT_CLOSED');
        read.span.end();
        return;
      }
      const waited = performance.now() - started;
      entry.lastReadAt = this.clock();
      decision = decideRead(
        this.deps.store,
        entry,
        request.minGeneration,
        waited >= request.waitMs || this.closing,
        Math.round(waited),
      );
    }
    if (decision.kind === 'serve') this.sendToken(req, res, entry, read);
    else this.sendError(res, decision.error, read);
  }

  private sendToken(
    req: IncomingMessage,
    res: ServerResponse,
    entry: UserEntry,
    read: ReadInFlight,
  ): void {
    const state = entry.state!;
    const now = this.clock();
    // While shutting down, close each connection after its answer so the server can stop.
    if (this.closing) res.setHeader('connection', 'close');
    if (req.headers.accept?.startsWith('text/plain')) {
      res.writeHead(200, {
        'content-type': 'text/plain; charset=utf-8',
        'cache-control': 'no-store',
        'x-token-generation': String(state.generation),
        'x-token-expires-at': entry.expiresAtIso,
        'content-length': Buffer.byteLength(state.accessToken),
      });
      res.end(state.accessToken);
    } else {
      const expiresIn = Math.floor((state.expiresAtMs - now) / 1000);
      let answer = this.bodies.get(state);
      if (answer?.expiresIn !== expiresIn) {
        const body = JSON.stringify({
          access_token: state.accessToken,
          token_type: state.tokenType,
          expires_at: entry.expiresAtIso,
          expires_in: expiresIn,
          generation: state.generation,
        });
        answer = { expiresIn, body, length: Buffer.byteLength(body) };
        this.bodies.set(state, answer);
      }
      res.writeHead(200, {
        'content-type': JSON_TYPE,
        'cache-control': 'no-store',
        'content-length': answer.length,
      });
      res.end(answer.body);
    }
    const waited = performance.now() - read.started;
    this.deps.metrics.tokenRead('OK', waited / 1000);
    this.deps.metrics.tokenServed(
      (now - (state.receivedAtMs ?? now)) / 1000,
      (state.expiresAtMs - now) / 1000,
    );
    const span = read.span;
    if (span.isRecording()) {
      span.setAttributes({
        [ATTR.outcome]: 'OK',
        [ATTR.generation]: state.generation,
        'tb.wait_ms': Math.round(waited),
        'tb.token.remaining_ms': state.expiresAtMs - now,
      });
      // The read links to the rotation that produced the token it served.
      const rotation = spanContextOf(state.traceparent ?? '');
      if (rotation) span.addLink({ context: rotation });
    }
    span.end();
  }

  private sendError(res: ServerResponse, err: unknown, read?: ReadInFlight): void {
    let error: SidecarError;
    if (err instanceof SidecarError) error = err;
    else {
      this.deps.log.error(
        { err: err instanceof Error ? err.message : String(err) },
        'internal error in a request',
      );
      error = new InternalError();
    }
    if (read) {
      this.deps.metrics.tokenRead(error.code, (performance.now() - read.started) / 1000);
      read.span.setAttribute(ATTR.outcome, error.code);
      if (error.status >= 500) markFailed(read.span, error);
      read.span.end();
    }
    if (this.closing) res.setHeader('connection', 'close');
    sendJson(
      res,
      error.status,
      { error: { code: error.code, message: error.message } },
      error.headers(),
    );
  }
}

function sendJson(
  res: ServerResponse,
  status: number,
  value: unknown,
  headers: Record<string, string> = {},
): void {
  const body = JSON.stringify(value);
  res.writeHead(status, {
    ...headers,
    'content-type': JSON_TYPE,
    'cache-control': 'no-store',
    'content-length': Buffer.byteLength(body),
  });
  res.end(body);
}
