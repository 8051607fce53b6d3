import { setTimeout as sleep } from 'node:timers/promises';
import type { ClientDuplexStream } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { ATTR, userHash } from '../shared/telemetry/span-attributes.js';
import { tracer } from '../shared/telemetry/spans.js';
import { contextOf } from '../shared/telemetry/trace-context.js';
import {
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
}

/** A stream that lived this long without a message still counts as healthy (resets backoff). */
const HEALTHY_STREAM_MS = 5_000;

export function toTokenState(event: TokenEvent, receivedAtMs = Date.now()): TokenState {
  return {
    generation: event.generation,
    status: statusName(event.status) ?? 'UNKNOWN',
    accessToken: event.accessToken,
    tokenType: event.tokenType || 'Bearer',
    expiresAtMs: event.expiresAt?.getTime() ?? 0,
    errorCode: event.errorCode,
    traceparent: event.traceparent,
    receivedAtMs,
  };
}

/**
 * The sidecar's one Watch stream. It subscribes every user the store holds, feeds each event to
 * the store (which keeps only newer generations), and after any end reconnects with jittered
 * exponential backoff, resubscribing each user after the newest generation it holds.
 */
export class BrokerLink {
  private call: ClientDuplexStream<WatchRequest, WatchResponse> | undefined;
  private received = false;
  private peerAddress = '';
  private readonly refreshing = new Map<string, Promise<void>>();
  private readonly lastRefresh = new Map<string, number>();

  constructor(
    private readonly api: BrokerApi,
    private readonly store: TokenStore,
    private readonly options: BrokerLinkOptions,
    private readonly log: Logger,
    private readonly metrics: SidecarMetrics,
    private readonly clock: () => number = Date.now,
    private readonly random: () => number = Math.random,
  ) {}

  /** The stream is open and a broker is known to answer on it. */
  get up(): boolean {
    return this.call !== undefined && (this.received || this.api.channelReady());
  }

  /** Address of the broker replica the stream runs on ('' while down). */
  get peer(): string {
    if (!this.call) return '';
    const peer = this.peerAddress || this.call.getPeer();
    return peer === 'unknown' ? '' : peer;
  }

  /** Keeps a stream open until `signal` aborts. */
  async run(signal: AbortSignal): Promise<void> {
    let attempt = 0;
    while (!signal.aborted) {
      const healthy = await this.stream(signal);
      if (signal.aborted) break;
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
    if (this.call) this.writeSubscribe(this.call, entry);
  }

  unsubscribe(entry: UserEntry): void {
    this.refreshing.delete(entry.key);
    this.lastRefresh.delete(entry.key);
    this.call?.write({
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
  private stream(signal: AbortSignal): Promise<boolean> {
    const startedAt = this.clock();
    const call = this.api.openWatch();
    this.call = call;
    this.received = false;
    this.peerAddress = '';
    const onAbort = () => call.cancel();
    signal.addEventListener('abort', onAbort, { once: true });
    for (const entry of this.store.all()) this.writeSubscribe(call, entry);
    call.on('data', (response: WatchResponse) => this.onResponse(call, response));
    return new Promise((resolve) => {
      let finished = false;
      const finish = (code: number | undefined, details: string) => {
        if (finished) return;
        finished = true;
        signal.removeEventListener('abort', onAbort);
        if (this.call === call) this.call = undefined;
        const healthy = this.received || this.clock() - startedAt >= HEALTHY_STREAM_MS;
        if (!signal.aborted)
          this.log.warn(
            { code, details, peer: this.peerAddress || undefined },
            'broker stream ended; reconnecting',
          );
        resolve(healthy);
      };
      call.on('status', (status: { code: number; details: string }) =>
        finish(status.code, status.details),
      );
      call.on('error', (err: Error & { code?: number; details?: string }) =>
        finish(err.code, err.details ?? err.message),
      );
    });
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
        },
      },
    });
  }

  private onResponse(
    call: ClientDuplexStream<WatchRequest, WatchResponse>,
    response: WatchResponse,
  ): void {
    if (!this.received) {
      this.received = true;
      this.peerAddress = call.getPeer();
      this.log.info({ peer: this.peerAddress }, 'broker stream up');
    }
    const event = response.event;
    if (event?.$case === 'token') {
      const token = event.value;
      const outcome = this.deliver(token, 'watch');
      this.log.debug(
        {
          tenant: token.tenant,
          user: token.user,
          generation: token.generation,
          status: statusName(token.status),
          outcome,
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
   * Hands a session state to the store inside a `sidecar.deliver` span whose parent is the
   * rotation that produced it (the event's traceparent), so one trace shows a rotation reaching
   * every sidecar.
   */
  private deliver(token: TokenEvent, via: 'watch' | 'refresh'): ApplyOutcome {
    const span = tracer.startSpan(
      'sidecar.deliver',
      {
        attributes: {
          [ATTR.tenant]: token.tenant,
          [ATTR.userHash]: userHash(token.user),
          [ATTR.generation]: token.generation,
          'tb.via': via,
        },
      },
      contextOf(token.traceparent),
    );
    const outcome = this.store.apply(token, toTokenState(token, this.clock()));
    span.setAttribute(ATTR.outcome, outcome);
    span.end();
    this.metrics.tokenEvent(outcome);
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
