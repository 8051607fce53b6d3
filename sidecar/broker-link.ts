import { setTimeout as sleep } from 'node:timers/promises';
import { status as grpcStatus, type ClientDuplexStream } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { ATTR, userHash } from '../shared/telemetry/span-attributes.js';
import { tracer } from '../shared/telemetry/spans.js';
import { contextOf } from '../shared/telemetry/trace-context.js';
import {
  type GetTokenRequest,
  type GetTokenResponse,
  type RefreshRequest,
  type RefreshResponse,
  type TokenEvent,
  type WatchRequest,
  type WatchResponse,
} from '../gen/tokenbroker/v1/token_broker.js';
import { statusName } from '../shared/session-status.js';
import type { SidecarMetrics } from './metrics.js';
import { reconnectDelayMs } from './reconnect-backoff.js';
import type { ApplyOutcome, TokenState, TokenStore, UserEntry } from './token-store.js';

/** The part of the broker the sidecar uses. */
export interface BrokerApi {
  openWatch(): ClientDuplexStream<WatchRequest, WatchResponse>;
  refresh(request: RefreshRequest, timeoutMs: number): Promise<RefreshResponse>;
  getToken(request: GetTokenRequest, timeoutMs: number): Promise<GetTokenResponse>;
  /** At least one broker connection is up. */
  channelReady(): boolean;
  close(): void;
}

export interface BrokerLinkOptions {
  reconnectBaseMs: number;
  reconnectMaxMs: number;
  refreshTimeoutMs: number;
  /** At most one Refresh per user in flight, and the next no sooner than this after it. */
  refreshRetryMs: number;
  /** Watch streams kept open at once (each on another replica when there are several); default 2. */
  streams?: number;
  /** Deadline of one GetToken attempt when a held token nears its skew; default 1000. */
  fetchTimeoutMs?: number;
}

/** A stream that lived this long without a message still counts as healthy (resets backoff). */
const HEALTHY_STREAM_MS = 5_000;
/** GetToken attempts per fetch: each call may land on another replica (round robin). */
const FETCH_ATTEMPTS = 3;
/** At most one fetch per user this often. */
const FETCH_RETRY_MS = 1_000;
/** Two streams on the same replica: the second is moved after this, doubling up to the max. */
const RESPREAD_FIRST_MS = 1_000;
const RESPREAD_MAX_MS = 60_000;

export function toTokenState(event: TokenEvent, receivedAtMs = Date.now()): TokenState {
  return {
    epoch: event.epoch,
    generation: event.generation,
    status: statusName(event.status) ?? 'UNKNOWN',
    accessToken: event.accessToken,
    tokenType: event.tokenType || 'Bearer',
    expiresAtMs: event.expiresAt?.getTime() ?? 0,
    issuedAtMs: event.issuedAt?.getTime() ?? 0,
    errorCode: event.errorCode,
    traceparent: event.traceparent,
    receivedAtMs,
  };
}

/** One of the link's Watch streams. */
interface StreamSlot {
  readonly index: number;
  call: ClientDuplexStream<WatchRequest, WatchResponse> | undefined;
  received: boolean;
  peerAddress: string;
  /** Ends the current stream early to reopen it on another replica. */
  respreadTimer: NodeJS.Timeout | undefined;
  respreadDelayMs: number;
  /** The call ended on purpose to move it (reopened at once, no backoff). */
  respreading: ClientDuplexStream<WatchRequest, WatchResponse> | undefined;
}

/**
 * The sidecar's Watch streams: two when the broker address has several replicas, each on another
 * replica, so one frozen or dying replica costs nothing (the other stream keeps delivering). Each
 * subscribes every user the store holds and feeds each event to the store, which keeps only newer
 * generations (within an epoch), so the duplicate copy of every event is dropped there. After any
 * end a stream reconnects with jittered exponential backoff, resubscribing each user after the
 * newest generation (and epoch) it holds. When a held token nears its skew and no newer
 * generation came, `fetchCurrent` asks a replica with GetToken.
 */
export class BrokerLink {
  private readonly slots: StreamSlot[];
  private readonly refreshing = new Map<string, Promise<void>>();
  private readonly lastRefresh = new Map<string, number>();
  private readonly fetching = new Map<string, Promise<void>>();
  private readonly lastFetch = new Map<string, number>();

  constructor(
    private readonly api: BrokerApi,
    private readonly store: TokenStore,
    private readonly options: BrokerLinkOptions,
    private readonly log: Logger,
    private readonly metrics: SidecarMetrics,
    private readonly clock: () => number = Date.now,
    private readonly random: () => number = Math.random,
  ) {
    this.slots = Array.from({ length: Math.max(1, options.streams ?? 2) }, (_, index) => ({
      index,
      call: undefined,
      received: false,
      peerAddress: '',
      respreadTimer: undefined,
      respreadDelayMs: RESPREAD_FIRST_MS,
      respreading: undefined,
    }));
  }

  /** A stream is open and a broker is known to answer on it. */
  get up(): boolean {
    return this.streamsUp > 0;
  }

  /** Address of a broker replica a stream runs on ('' while all are down). */
  get peer(): string {
    return this.peers[0] ?? '';
  }

  /** Streams open on a broker that answered (or with the channel ready). */
  get streamsUp(): number {
    return this.slots.filter((s) => s.call !== undefined && (s.received || this.api.channelReady()))
      .length;
  }

  /** The replicas the open streams run on (one per stream, known once it delivered). */
  get peers(): string[] {
    return this.slots.map((s) => this.peerOf(s)).filter((p) => p !== '');
  }

  /** Known once the broker answered (headers or a message); before, grpc-js may name the target. */
  private peerOf(slot: StreamSlot): string {
    return slot.call && slot.peerAddress !== 'unknown' ? slot.peerAddress : '';
  }

  /** Keeps the streams open until `signal` aborts. */
  async run(signal: AbortSignal): Promise<void> {
    await Promise.all(this.slots.map((slot) => this.runSlot(slot, signal)));
  }

  private async runSlot(slot: StreamSlot, signal: AbortSignal): Promise<void> {
    let attempt = 0;
    while (!signal.aborted) {
      const { healthy, respread } = await this.stream(slot, signal);
      if (signal.aborted) break;
      // Moved on purpose: reopen at once (round robin picks the next replica).
      if (respread) continue;
      if (healthy) attempt = 0;
      const delay = reconnectDelayMs(
        attempt++,
        { baseMs: this.options.reconnectBaseMs, maxMs: this.options.reconnectMaxMs },
        this.random,
      );
      this.metrics.brokerReconnect();
      await sleep(delay, undefined, { signal }).catch(() => undefined);
    }
  }

  subscribe(entry: UserEntry): void {
    for (const slot of this.slots) if (slot.call) this.writeSubscribe(slot.call, entry);
  }

  unsubscribe(entry: UserEntry): void {
    this.refreshing.delete(entry.key);
    this.lastRefresh.delete(entry.key);
    this.fetching.delete(entry.key);
    this.lastFetch.delete(entry.key);
    for (const slot of this.slots)
      slot.call?.write({
        action: { $case: 'unsubscribe', value: { tenant: entry.tenant, user: entry.user } },
      });
  }

  /**
   * Tells the broker that `generation` was rejected. Coalesced: at most one call per user in
   * flight, and none sooner than `refreshRetryMs` after the last. The answer feeds the store.
   */
  requestRefresh(entry: UserEntry, generation: number): void {
    if (this.refreshing.has(entry.key)) return;
    const last = this.lastRefresh.get(entry.key);
    if (last !== undefined && this.clock() - last < this.options.refreshRetryMs) return;
    const done = this.callRefresh(entry, generation).finally(() => {
      this.refreshing.delete(entry.key);
      this.lastRefresh.set(entry.key, this.clock());
    });
    this.refreshing.set(entry.key, done);
  }

  /**
   * The held token nears its skew and no stream brought a newer one (its replica may be frozen):
   * asks with GetToken, a few times with a short deadline, each call going to the next replica.
   * Coalesced per user and at most once per FETCH_RETRY_MS; the answer feeds the store.
   */
  fetchCurrent(entry: UserEntry): void {
    if (this.fetching.has(entry.key)) return;
    const last = this.lastFetch.get(entry.key);
    if (last !== undefined && this.clock() - last < FETCH_RETRY_MS) return;
    const done = this.callGetToken(entry).finally(() => {
      this.fetching.delete(entry.key);
      this.lastFetch.set(entry.key, this.clock());
    });
    this.fetching.set(entry.key, done);
  }

  private async callGetToken(entry: UserEntry): Promise<void> {
    const ref = { tenant: entry.tenant, user: entry.user };
    const held = entry.state?.generation ?? 0;
    let failure: ReturnType<typeof grpcFailure> | undefined;
    for (let attempt = 0; attempt < FETCH_ATTEMPTS; attempt++) {
      try {
        const response = await this.api.getToken(ref, this.options.fetchTimeoutMs ?? 1_000);
        this.metrics.fetchCall('ok');
        if (response.token) {
          const outcome = this.deliver(response.token, 'get_token');
          this.log.info(
            { ...ref, held, generation: response.token.generation, outcome },
            'held token near its skew: asked a broker replica (GetToken)',
          );
        }
        return;
      } catch (err) {
        this.metrics.fetchCall('error');
        failure = grpcFailure(err);
        // Only an unanswered call is worth another replica; a refusal would be the same there.
        if (
          failure.code !== grpcStatus.DEADLINE_EXCEEDED &&
          failure.code !== grpcStatus.UNAVAILABLE
        )
          break;
      }
    }
    this.log.warn({ ...ref, held, ...failure }, 'GetToken for a token near its skew failed');
  }

  private async callRefresh(entry: UserEntry, generation: number): Promise<void> {
    const ref = { tenant: entry.tenant, user: entry.user };
    try {
      const response = await this.api.refresh(
        { ...ref, generation },
        this.options.refreshTimeoutMs,
      );
      this.metrics.refreshCall('ok');
      if (response.token) this.deliver(response.token, 'refresh');
    } catch (err) {
      this.metrics.refreshCall('error');
      this.log.warn({ ...ref, generation, ...grpcFailure(err) }, 'refresh request failed');
    }
  }

  /** One stream's life; resolves when it ends, with whether it was healthy. */
  private stream(
    slot: StreamSlot,
    signal: AbortSignal,
  ): Promise<{ healthy: boolean; respread: boolean }> {
    const startedAt = this.clock();
    const call = this.api.openWatch();
    slot.call = call;
    slot.received = false;
    slot.peerAddress = '';
    let respread = false;
    const onAbort = () => call.cancel();
    signal.addEventListener('abort', onAbort, { once: true });
    for (const entry of this.store.all()) this.writeSubscribe(call, entry);
    // Brokers send headers as a stream opens: the replica is known before any event.
    call.on('metadata', () => this.answered(slot, call));
    call.on('data', (response: WatchResponse) => this.onResponse(slot, call, response));
    return new Promise((resolve) => {
      let finished = false;
      const finish = (code: number | undefined, details: string) => {
        if (finished) return;
        finished = true;
        signal.removeEventListener('abort', onAbort);
        clearTimeout(slot.respreadTimer);
        slot.respreadTimer = undefined;
        respread ||= slot.respreading === call;
        if (slot.call === call) slot.call = undefined;
        const healthy = slot.received || this.clock() - startedAt >= HEALTHY_STREAM_MS;
        if (!signal.aborted && !respread)
          this.log.warn(
            { code, details, peer: slot.peerAddress || undefined, stream: slot.index },
            'broker stream ended; reconnecting',
          );
        resolve({ healthy, respread });
      };
      call.on('status', (status: { code: number; details: string }) =>
        finish(status.code, status.details),
      );
      call.on('error', (err: Error & { code?: number; details?: string }) =>
        finish(err.code, err.details ?? err.message),
      );
    });
  }

  /**
   * Streams after the first move when they share a replica with another stream: after a delay
   * that doubles each time (one replica only: rarely), reset once they run on distinct replicas.
   */
  private checkSpread(): void {
    for (const slot of this.slots) {
      if (slot.index === 0 || !slot.call || !slot.peerAddress) continue;
      const shared = this.slots.some(
        (other) => other.index < slot.index && other.call && other.peerAddress === slot.peerAddress,
      );
      if (!shared) {
        slot.respreadDelayMs = RESPREAD_FIRST_MS;
        continue;
      }
      if (slot.respreadTimer) continue;
      const call = slot.call;
      const delay = slot.respreadDelayMs;
      slot.respreadDelayMs = Math.min(RESPREAD_MAX_MS, delay * 2);
      slot.respreadTimer = setTimeout(() => {
        slot.respreadTimer = undefined;
        if (slot.call !== call) return;
        this.log.debug(
          { peer: slot.peerAddress, stream: slot.index },
          'moving a stream that shares a replica',
        );
        slot.respreading = call;
        call.cancel();
      }, delay);
      slot.respreadTimer.unref();
    }
  }

  private writeSubscribe(
    call: ClientDuplexStream<WatchRequest, WatchResponse>,
    entry: UserEntry,
  ): void {
    call.write({
      action: {
        $case: 'subscribe',
        value: {
          tenant: entry.tenant,
          user: entry.user,
          afterGeneration: entry.state?.generation ?? 0,
          epoch: entry.state?.epoch ?? '',
        },
      },
    });
  }

  private answered(slot: StreamSlot, call: ClientDuplexStream<WatchRequest, WatchResponse>): void {
    if (slot.received || slot.call !== call) return;
    slot.received = true;
    slot.peerAddress = call.getPeer();
    this.log.info({ peer: slot.peerAddress, stream: slot.index }, 'broker stream up');
    this.checkSpread();
  }

  private onResponse(
    slot: StreamSlot,
    call: ClientDuplexStream<WatchRequest, WatchResponse>,
    response: WatchResponse,
  ): void {
    this.answered(slot, call);
    const event = response.event;
    if (event?.$case === 'token') {
      const token = event.value;
      const outcome = this.deliver(token, 'watch');
      this.log.debug(
        {
          tenant: token.tenant,
          user: token.user,
          epoch: token.epoch,
          generation: token.generation,
          status: statusName(token.status),
          outcome,
          stream: slot.index,
        },
        'token event',
      );
    } else if (event?.$case === 'error') {
      const { tenant, user, code, message } = event.value;
      if (code === 'SESSION_NOT_FOUND') this.store.markNotFound({ tenant, user });
      else this.log.warn({ tenant, user, code, message }, 'broker refused a subscription');
    }
  }

  /**
   * Hands a session state to the store. A state it takes gets a `sidecar.deliver` span whose
   * parent is the rotation that produced it (the event's traceparent), so one trace shows a
   * rotation reaching every sidecar once; the duplicate the second stream brings gets none.
   */
  private deliver(token: TokenEvent, via: 'watch' | 'refresh' | 'get_token'): ApplyOutcome {
    const startTime = Date.now();
    const outcome = this.store.apply(token, toTokenState(token, this.clock()));
    this.metrics.tokenEvent(outcome);
    if (outcome !== 'applied') return outcome;
    tracer
      .startSpan(
        'sidecar.deliver',
        {
          startTime,
          attributes: {
            [ATTR.tenant]: token.tenant,
            [ATTR.userHash]: userHash(token.user),
            [ATTR.generation]: token.generation,
            'tb.via': via,
            [ATTR.outcome]: outcome,
          },
        },
        contextOf(token.traceparent),
      )
      .end();
    return outcome;
  }
}

function grpcFailure(err: unknown): { code?: number; errorCode?: string; details?: string } {
  const e = err as { code?: number; details?: string; metadata?: { get(key: string): unknown[] } };
  const errorCode = e.metadata?.get('tb-error-code')[0];
  return {
    code: e.code,
    errorCode: typeof errorCode === 'string' ? errorCode : undefined,
    details: e.details,
  };
}
