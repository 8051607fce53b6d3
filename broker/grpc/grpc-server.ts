import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import {
  TokenBrokerServiceService,
  type EnrollRequest,
  type Session,
  type TokenBrokerServiceServer,
  type TokenEvent,
  type WatchRequest,
  WatchResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';
import { STATUS_TO_PROTO } from '../../shared/session-status.js';
import { DESCRIPTOR_FILES } from '../../gen/descriptor-files.js';
import { auditCaller, type AccessControl } from '../auth/access-control.js';
import type { Verb } from '../auth/access-policy.js';
import type { CallerIdentity } from '../auth/service-account-verifier.js';
import {
  BrokerError,
  errorCode,
  InvalidArgumentError,
  QUOTE_PREFIX_LENGTH,
  ResourceExhaustedError,
  UnauthenticatedError,
  type BrokerErrorCode,
} from '../errors.js';
import { MAX_ID_LENGTH } from '../../shared/session-ref.js';
import {
  DEFAULT_CONNECTION_AGE,
  DEFAULT_WATCH_LIMITS,
  type ConnectionAge,
  type WatchLimits,
} from '../config.js';
import { validateRef, type EnrollCredential, type SessionService } from '../session-service.js';
import { KeySpace } from '../store/keys.js';
import {
  epochOf,
  type SessionMetadata,
  type SessionRecord,
  type SessionRef,
} from '../store/session-record.js';
import type { Delivery, WatchHub, WatchSink } from '../watch-hub.js';
import { HealthStatus } from './health-service.js';
import { ReflectionService } from './reflection-service.js';

const SERVICE_NAME = 'tokenbroker.v1.TokenBrokerService';
const HEALTH_SERVICE_NAME = 'grpc.health.v1.Health';
const REFLECTION_SERVICE_NAME = 'grpc.reflection.v1.ServerReflection';

/**
 * A WatchResponse encoded once, written as is to every stream it goes to (the service's Watch
 * serializer passes it through): a rotation watched by N streams is encoded once, not N times.
 */
class EncodedWatchResponse {
  private constructor(readonly bytes: Buffer) {}

  static of(response: WatchResponse): EncodedWatchResponse {
    const bytes = WatchResponse.encode(response).finish();
    return new EncodedWatchResponse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  }
}

/** The service as served: Watch also takes EncodedWatchResponse (the generated one does not). */
const SERVED_SERVICE: typeof TokenBrokerServiceService = {
  ...TokenBrokerServiceService,
  watch: {
    ...TokenBrokerServiceService.watch,
    responseSerialize: (value: WatchResponse | EncodedWatchResponse) =>
      value instanceof EncodedWatchResponse
        ? value.bytes
        : TokenBrokerServiceService.watch.responseSerialize(value),
  },
};

/** A token event as one fan-out's streams send it: derived once per Delivery. */
const TOKEN_FRAME = Symbol('watch token frame');

function tokenFrame(record: SessionRecord): { id: string; response: EncodedWatchResponse } {
  return {
    id: KeySpace.sessionId(record),
    response: EncodedWatchResponse.of({ event: { $case: 'token', value: toTokenEvent(record) } }),
  };
}

/**
 * The status of every broker error code; codes mapped to INTERNAL are logged and reach the client
 * only as "internal error". A new code without an entry here fails to compile.
 */
const GRPC_CODE: Record<BrokerErrorCode, grpc.status> = {
  INVALID_ARGUMENT: grpc.status.INVALID_ARGUMENT,
  RESOURCE_EXHAUSTED: grpc.status.RESOURCE_EXHAUSTED,
  CONFIG_INVALID: grpc.status.INVALID_ARGUMENT,
  SESSION_NOT_FOUND: grpc.status.NOT_FOUND,
  REAUTH_REQUIRED: grpc.status.FAILED_PRECONDITION,
  BROKER_CLIENT_REJECTED: grpc.status.FAILED_PRECONDITION,
  SESSION_INACTIVE: grpc.status.FAILED_PRECONDITION,
  UNAVAILABLE: grpc.status.UNAVAILABLE,
  LOCK_UNAVAILABLE: grpc.status.UNAVAILABLE,
  SHUTTING_DOWN: grpc.status.UNAVAILABLE,
  UNAUTHENTICATED: grpc.status.UNAUTHENTICATED,
  PERMISSION_DENIED: grpc.status.PERMISSION_DENIED,
  // A broken policy file is refused when it is read; it never reaches a call.
  POLICY_INVALID: grpc.status.INTERNAL,
  // The session service turns IdP failures into the codes above; one that escapes is a bug.
  IDP_INVALID_GRANT: grpc.status.INTERNAL,
  IDP_TOKEN_CONSUMED: grpc.status.INTERNAL,
  IDP_LOGIN_REJECTED: grpc.status.INTERNAL,
  IDP_INVALID_CLIENT: grpc.status.INTERNAL,
  IDP_UNAVAILABLE: grpc.status.INTERNAL,
  IDP_PROTOCOL_ERROR: grpc.status.INTERNAL,
  LOGIN_SECRET_UNREADABLE: grpc.status.INTERNAL,
  // A record no configured key opens: the operator must restore the key (or the user re-enroll).
  SEALING_KEY_UNKNOWN: grpc.status.FAILED_PRECONDITION,
  // Tampered or corrupt state: that one session's record is lost, not the broker.
  SEAL_INVALID: grpc.status.DATA_LOSS,
};

function toDate(ms: number): Date | undefined {
  return ms > 0 ? new Date(ms) : undefined;
}

export function toTokenEvent(record: SessionRecord, now = Date.now()): TokenEvent {
  // Only an active session's unexpired token is handed out.
  const usable = record.status === 'ACTIVE' && record.accessExpiresAt > now;
  return {
    tenant: record.tenant,
    user: record.user,
    generation: record.generation,
    status: STATUS_TO_PROTO[record.status],
    accessToken: usable ? record.accessToken : '',
    tokenType: record.tokenType,
    expiresAt: toDate(record.accessExpiresAt),
    traceparent: record.traceparent,
    tracestate: '',
    errorCode: record.lastErrorCode,
    epoch: epochOf(record),
    issuedAt: toDate(record.issuedAt),
  };
}

export function toSession(meta: SessionMetadata): Session {
  return {
    tenant: meta.tenant,
    user: meta.user,
    idp: meta.idp,
    generation: meta.generation,
    status: STATUS_TO_PROTO[meta.status],
    accessTokenExpiresAt: toDate(meta.accessExpiresAt),
    refreshTokenExpiresAt: toDate(meta.refreshExpiresAt),
    issuedAt: toDate(meta.issuedAt),
    nextRefreshAt: toDate(meta.nextRefreshAt),
    lastUsedAt: toDate(meta.lastUsedAt),
    lastErrorCode: meta.lastErrorCode,
    failedAttempts: meta.failedAttempts,
    enrolledBy: meta.enrolledBy ?? '',
    epoch: epochOf(meta),
  };
}

/**
 * A Watch stream: holds at most one pending answer per key (a session's newest state, or its
 * newest error), only while the peer does not read. A peer that stops reading with more than the
 * bound queued (bytes, or twice the subscriptions a stream may hold) is ended RESOURCE_EXHAUSTED
 * and its queue dropped; it may reconnect and get every session's current state again.
 */
class StreamSink implements WatchSink {
  private readonly pending = new Map<string, EncodedWatchResponse>();
  private pendingBytes = 0;
  private blocked = false;
  private ended = false;

  constructor(
    private readonly call: grpc.ServerDuplexStream<WatchRequest, WatchResponse>,
    private readonly limits: WatchLimits,
    private readonly onOverflow: (queued: { events: number; bytes: number }) => void,
  ) {
    call.on('drain', () => {
      this.blocked = false;
      this.flush();
    });
  }

  deliver(_record: SessionRecord, delivery: Delivery): void {
    const frame = delivery.once(TOKEN_FRAME, tokenFrame);
    this.sendEncoded(frame.id, frame.response);
  }

  send(id: string, response: WatchResponse): void {
    if (this.closed()) return;
    this.sendEncoded(id, EncodedWatchResponse.of(response));
  }

  /** Drops every queued answer (the stream ended); nothing is written after. */
  close(): void {
    this.ended = true;
    this.pending.clear();
    this.pendingBytes = 0;
  }

  private sendEncoded(id: string, response: EncodedWatchResponse): void {
    if (this.closed()) return;
    if (!this.blocked && this.pending.size === 0) {
      this.write(response);
      return;
    }
    // A newer state replaces an unsent older one: a slow reader skips, never reorders.
    this.drop(id);
    this.pending.set(id, response);
    this.pendingBytes += response.bytes.length;
    if (
      this.pendingBytes > this.limits.maxQueuedBytes ||
      this.pending.size > 2 * this.limits.maxSubscriptions
    ) {
      this.overflow();
      return;
    }
    this.flush();
  }

  private closed(): boolean {
    return this.ended || this.call.cancelled || this.call.writableEnded;
  }

  /** SERVED_SERVICE's Watch serializer writes an EncodedWatchResponse as it is. */
  private write(response: EncodedWatchResponse): void {
    if (!this.call.write(response as unknown as WatchResponse)) this.blocked = true;
  }

  private drop(id: string): void {
    const queued = this.pending.get(id);
    if (!queued) return;
    this.pending.delete(id);
    this.pendingBytes -= queued.bytes.length;
  }

  private overflow(): void {
    const queued = { events: this.pending.size, bytes: this.pendingBytes };
    this.close();
    this.onOverflow(queued);
  }

  private flush(): void {
    if (this.closed()) return;
    while (!this.blocked && this.pending.size > 0) {
      const [id, queued] = this.pending.entries().next().value as [string, EncodedWatchResponse];
      this.drop(id);
      this.write(queued);
    }
  }
}

export interface GrpcServerDeps {
  sessions: SessionService;
  hub: WatchHub;
  log: Logger;
  /** Caller authentication and the access policy; undefined only with TB_AUTH=off. */
  access?: AccessControl | undefined;
  /** The listener's credentials (TLS); default plaintext. */
  credentials?: grpc.ServerCredentials | undefined;
  /** Per-stream bounds of Watch; default DEFAULT_WATCH_LIMITS. */
  watchLimits?: WatchLimits | undefined;
  /** Connection age bound; default DEFAULT_CONNECTION_AGE. */
  connectionAge?: ConnectionAge | undefined;
}

/**
 * Clients may ping this often while idle (the sidecar's keepalive notices a silent broker in a few
 * seconds). grpc-js 1.14 does not police client pings itself; the option tells any HTTP/2 layer
 * that does.
 */
export const MIN_CLIENT_PING_INTERVAL_MS = 1_000;

const HEALTH_PREFIX = '/grpc.health.v1.Health/';

/** The caller verified for a call, by the call's metadata (set by the authentication interceptor). */
const callers = new WeakMap<grpc.Metadata, CallerIdentity>();

/** The gRPC edge: maps requests to SessionService calls and BrokerErrors to status codes. */
export class BrokerGrpcServer {
  readonly server: grpc.Server;
  private readonly health = new HealthStatus(['', SERVICE_NAME]);
  private readonly streams = new Map<
    grpc.ServerDuplexStream<WatchRequest, WatchResponse>,
    StreamSink
  >();

  constructor(private readonly deps: GrpcServerDeps) {
    const age = deps.connectionAge ?? DEFAULT_CONNECTION_AGE;
    this.server = new grpc.Server({
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
      'grpc.keepalive_permit_without_calls': 1,
      'grpc.http2.min_ping_interval_without_data_ms': MIN_CLIENT_PING_INTERVAL_MS,
      // A connection lives a bounded time (grpc-js adds +-10% jitter), then gets GOAWAY: its
      // Watch streams end after the grace and sidecars reopen them, round robin over every
      // replica, so streams spread again after a replica returns. Nothing is lost: a reopened
      // stream resubscribes after the generation it holds.
      'grpc.max_connection_age_ms': age.maxMs,
      'grpc.max_connection_age_grace_ms': age.graceMs,
      interceptors: deps.access ? [this.authenticating(deps.access)] : [],
    });
    this.server.addService(SERVED_SERVICE, this.implementation());
    this.health.addToServer(this.server);
    new ReflectionService(DESCRIPTOR_FILES, [
      SERVICE_NAME,
      HEALTH_SERVICE_NAME,
      REFLECTION_SERVICE_NAME,
    ]).addToServer(this.server);
  }

  /** Binds and starts serving; returns the bound port (useful with port 0). */
  async listen(address: string): Promise<number> {
    const port = await new Promise<number>((resolve, reject) =>
      this.server.bindAsync(
        address,
        this.deps.credentials ?? grpc.ServerCredentials.createInsecure(),
        (err, bound) => (err ? reject(err) : resolve(bound)),
      ),
    );
    this.setServing(true);
    return port;
  }

  setServing(serving: boolean): void {
    this.health.set('', serving);
    this.health.set(SERVICE_NAME, serving);
  }

  /** Ends every Watch stream so sidecars reconnect to another replica, then stops. */
  async shutdown(graceMs: number): Promise<void> {
    this.setServing(false);
    for (const [call, sink] of this.streams) {
      this.deps.hub.detach(sink);
      call.end();
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.server.forceShutdown();
        resolve();
      }, graceMs);
      this.server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private fail(err: unknown): grpc.ServiceError {
    const metadata = new grpc.Metadata();
    const code = err instanceof BrokerError ? GRPC_CODE[err.code] : grpc.status.INTERNAL;
    if (err instanceof BrokerError && code !== grpc.status.INTERNAL) {
      metadata.set('tb-error-code', err.code);
      return Object.assign(new Error(err.message), { code, details: err.message, metadata });
    }
    this.deps.log.error(
      {
        err: err instanceof Error ? err.message : String(err),
        detail: err instanceof BrokerError ? err.detail : undefined,
      },
      'internal error',
    );
    metadata.set('tb-error-code', 'INTERNAL');
    return Object.assign(new Error('internal error'), {
      code: grpc.status.INTERNAL,
      details: 'internal error',
      metadata,
    });
  }

  /**
   * Every call but health must carry a verifiable bearer token; the verified caller is kept for
   * the handler, and a call without one ends UNAUTHENTICATED before any handler runs (reflection
   * included).
   */
  private authenticating(access: AccessControl): grpc.ServerInterceptor {
    return (method, call) => {
      if (method.path.startsWith(HEALTH_PREFIX)) return new grpc.ServerInterceptingCall(call);
      return new grpc.ServerInterceptingCall(call, {
        start: (next) =>
          next({
            onReceiveMetadata: (metadata, pass) => {
              const value = metadata.get('authorization')[0];
              const header = typeof value === 'string' ? value : undefined;
              const known = access.cachedCaller(header);
              if (known) {
                callers.set(metadata, known);
                pass(metadata);
                return;
              }
              access
                .authenticate(header, {
                  rpc: method.path,
                  peer: call.getPeer(),
                })
                .then(
                  (caller) => {
                    callers.set(metadata, caller);
                    pass(metadata);
                  },
                  (err: unknown) => {
                    const status = this.fail(err);
                    call.sendStatus({
                      code: status.code,
                      details: status.details,
                      metadata: status.metadata,
                    });
                  },
                );
            },
          }),
      });
    };
  }

  /** The call's verified caller; undefined when authentication is off. */
  private caller(metadata: grpc.Metadata): CallerIdentity | undefined {
    if (!this.deps.access) return undefined;
    const caller = callers.get(metadata);
    // The interceptor runs before every handler; a call without a caller is a wiring bug.
    if (!caller) throw new UnauthenticatedError('missing', 'the call carries no verified caller');
    return caller;
  }

  /** Checks `verb` on `ref` for the caller (a no-op without authentication); returns the rule. */
  private authorize(caller: CallerIdentity | undefined, verb: Verb, ref: SessionRef): string {
    if (!caller || !this.deps.access) return '';
    return this.deps.access.authorize(caller, verb, ref);
  }

  private unary<Req, Res>(
    handler: (request: Req, caller: CallerIdentity | undefined) => Promise<Res>,
  ): grpc.handleUnaryCall<Req, Res> {
    return (call, callback) => {
      let caller: CallerIdentity | undefined;
      try {
        caller = this.caller(call.metadata);
      } catch (err) {
        callback(this.fail(err));
        return;
      }
      handler(call.request, caller).then(
        (response) => callback(null, response),
        (err: unknown) => callback(this.fail(err)),
      );
    };
  }

  private implementation(): TokenBrokerServiceServer {
    const { sessions } = this.deps;
    return {
      enroll: this.unary(async (req, caller) => {
        const ref = validateRef(req);
        const rule = this.authorize(caller, 'enroll', ref);
        let meta;
        try {
          meta = await sessions.enroll({
            tenant: req.tenant,
            user: req.user,
            idp: req.idp,
            credential: enrollCredential(req),
            enrolledBy: caller?.subject,
          });
        } catch (err) {
          if (caller) this.deps.access?.audit.enroll(auditCaller(caller), ref, rule, err);
          throw err;
        }
        if (caller) this.deps.access?.audit.enroll(auditCaller(caller), ref, rule);
        return { session: toSession(meta) };
      }),
      getToken: this.unary(async (req, caller) => {
        const ref = validateRef(req);
        const rule = this.authorize(caller, 'read', ref);
        const record = await sessions.getToken(ref);
        if (caller) this.deps.access?.audit.read(auditCaller(caller), ref, rule);
        return { token: toTokenEvent(record) };
      }),
      refresh: this.unary(async (req, caller) => {
        this.authorize(caller, 'refresh', validateRef(req));
        return { token: toTokenEvent(await sessions.refresh(req)) };
      }),
      revoke: this.unary(async (req, caller) => {
        const ref = validateRef(req);
        const rule = this.authorize(caller, 'revoke', ref);
        let result;
        try {
          result = await sessions.revoke(ref);
        } catch (err) {
          if (caller) this.deps.access?.audit.revoke(auditCaller(caller), ref, rule, err);
          throw err;
        }
        if (caller) this.deps.access?.audit.revoke(auditCaller(caller), ref, rule);
        return {
          session: toSession(result.session),
          idpRevoked: result.idpRevoked,
          idpRevokeProblem: result.idpRevokeProblem,
        };
      }),
      listSessions: this.unary(async (req, caller) => {
        const access = this.deps.access;
        if (caller && access) access.authorizeList(caller, req.tenant);
        const page = await sessions.list(req.tenant, req.pageSize, req.pageToken);
        // Only what the caller may list; a filtered page may be shorter than asked.
        const visible =
          caller && access ? page.sessions.filter((s) => access.mayList(caller, s)) : page.sessions;
        return { sessions: visible.map(toSession), nextPageToken: page.next };
      }),
      watch: (call) => this.watch(call),
    };
  }

  private watch(call: grpc.ServerDuplexStream<WatchRequest, WatchResponse>): void {
    let caller: CallerIdentity | undefined;
    try {
      caller = this.caller(call.metadata);
    } catch (err) {
      call.destroy(this.fail(err));
      return;
    }
    const { hub, sessions, log } = this.deps;
    const limits = this.deps.watchLimits ?? DEFAULT_WATCH_LIMITS;
    const sink = new StreamSink(call, limits, (queued) => {
      log.warn(
        { peer: call.getPeer(), caller: caller?.subject, ...queued },
        'watch stream ended: the peer stopped reading past the queue bound',
      );
      // Queued writes go out first, then this status, should the peer read again.
      call.emit(
        'error',
        this.fail(
          new ResourceExhaustedError(
            `the stream stopped reading with more than ${limits.maxQueuedBytes} bytes or ` +
              `${2 * limits.maxSubscriptions} answers queued; reconnect and read`,
          ),
        ),
      );
    });
    this.streams.set(call, sink);
    // Headers at once: the sidecar learns which replica it reached before any event arrives.
    call.sendMetadata(new grpc.Metadata());
    // A stream lives on its caller's token: when that expires the stream ends, and the sidecar
    // reconnects with the fresh token kubelet wrote (its cached tokens keep serving meanwhile).
    const expiry = caller
      ? setTimeout(
          () => call.end(),
          Math.min(2 ** 31 - 1, Math.max(0, caller.expiresAt - Date.now())),
        )
      : undefined;
    expiry?.unref();
    const subscribed = new Map<string, ReturnType<typeof validateRef>>();
    // Renewed as often as touches count, so a short idle timeout cannot expire a watched session.
    const keepLease = setInterval(() => {
      for (const ref of subscribed.values()) void sessions.touch(ref).catch(() => undefined);
    }, sessions.touchIntervalMs);
    const done = () => {
      sink.close();
      clearInterval(keepLease);
      clearTimeout(expiry);
      this.streams.delete(call);
      hub.detach(sink);
    };
    call.on('cancelled', done);
    call.on('error', done);
    call.on('close', done);
    call.on('end', () => {
      done();
      call.end();
    });
    call.on('data', (request: WatchRequest) => {
      const action = request.action;
      const target = action?.value ?? { tenant: '', user: '' };
      let ref;
      try {
        if (!action) throw new InvalidArgumentError('action', 'must be subscribe or unsubscribe');
        ref = validateRef(action.value);
      } catch (err) {
        const echoed = { tenant: echoId(target.tenant), user: echoId(target.user) };
        sink.send(`error:${echoed.tenant}:${echoed.user}`, watchError(echoed, err));
        return;
      }
      const id = KeySpace.sessionId(ref);
      if (action.$case === 'unsubscribe') {
        subscribed.delete(id);
        hub.unsubscribe(ref, sink);
        return;
      }
      if (!subscribed.has(id) && subscribed.size >= limits.maxSubscriptions) {
        // This subscription only; the stream keeps serving the ones it holds.
        const err = new ResourceExhaustedError(
          `this stream already watches ${limits.maxSubscriptions} sessions ` +
            '(TB_WATCH_MAX_SUBSCRIPTIONS); unsubscribe one first or open another stream',
        );
        sink.send(`error:${id}`, watchError(ref, err));
        return;
      }
      let rule: string;
      try {
        rule = this.authorize(caller, 'read', ref);
      } catch (err) {
        // Denied: this subscription only; the stream keeps serving the others.
        sink.send(`error:${id}`, watchError(ref, err));
        return;
      }
      if (caller) this.deps.access?.audit.read(auditCaller(caller), ref, rule);
      subscribed.set(id, ref);
      void sessions.watchStarted(ref).catch(() => undefined);
      hub.subscribe(ref, sink, action.value.afterGeneration, action.value.epoch).then(
        (exists) => {
          if (!exists)
            sink.send(`error:${id}`, {
              event: {
                $case: 'error',
                value: {
                  ...ref,
                  code: 'SESSION_NOT_FOUND',
                  message: 'no session yet; the first state follows its enrollment',
                },
              },
            });
        },
        (err: unknown) => {
          log.warn({ err: String(err) }, 'watch subscribe failed');
          sink.send(`error:${id}`, watchError(ref, err));
        },
      );
    });
  }
}

/** The request's credential oneof, as the session service takes it. */
function enrollCredential(req: EnrollRequest): EnrollCredential | undefined {
  const credential = req.credential;
  switch (credential?.$case) {
    case 'refreshToken':
      return { kind: 'refresh_token', refreshToken: credential.value };
    case 'login': {
      const { username, secret } = credential.value;
      return secret?.$case === 'passwordFile'
        ? { kind: 'login', username, passwordFile: secret.value }
        : { kind: 'login', username, password: secret?.value ?? '' };
    }
    case 'tokenExchange':
      return {
        kind: 'token_exchange',
        subjectToken: credential.value.subjectToken,
        subjectTokenType: credential.value.subjectTokenType,
      };
    default:
      return undefined;
  }
}

function watchError(ref: { tenant: string; user: string }, err: unknown): WatchResponse {
  const code = errorCode(err);
  const message = err instanceof BrokerError ? err.message : 'internal error';
  return {
    event: { $case: 'error', value: { tenant: ref.tenant, user: ref.user, code, message } },
  };
}

/** An id as a WatchError echoes it: whole when it could be valid, else a short prefix. */
function echoId(value: string): string {
  return value.length > MAX_ID_LENGTH ? `${value.slice(0, QUOTE_PREFIX_LENGTH)}…` : value;
}
