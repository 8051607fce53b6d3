import { EventEmitter } from 'node:events';
import { status, type ClientDuplexStream } from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import {
  SessionStatus,
  type GetTokenResponse,
  type TokenEvent,
  type WatchRequest,
  type WatchResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerLink, type BrokerApi } from '../../sidecar/broker-link.js';
import type { SidecarMetrics } from '../../sidecar/metrics.js';
import { TokenStore } from '../../sidecar/token-store.js';

const log = pino({ level: 'silent' });
const alice = { tenant: 'diku', user: 'alice' };

/** A Watch stream as grpc-js hands it out, driven by the test. */
class FakeStream extends EventEmitter {
  readonly written: WatchRequest[] = [];
  cancelled = false;
  constructor(readonly peer: string) {
    super();
  }
  write(request: WatchRequest): boolean {
    this.written.push(request);
    return true;
  }
  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    this.emit('status', { code: status.CANCELLED, details: 'cancelled' });
  }
  getPeer(): string {
    return this.peer;
  }
  /** The broker answers: headers, then maybe events. */
  answer(...events: TokenEvent[]): void {
    this.emit('metadata');
    for (const event of events)
      this.emit('data', { event: { $case: 'token', value: event } } satisfies WatchResponse);
  }
}

function event(generation: number, extra: Partial<TokenEvent> = {}): TokenEvent {
  return {
    ...alice,
    generation,
    status: SessionStatus.SESSION_STATUS_ACTIVE,
    accessToken: `at-${generation}`,
    tokenType: 'Bearer',
    expiresAt: new Date(Date.now() + 60_000),
    traceparent: '',
    tracestate: '',
    errorCode: '',
    epoch: 'e1',
    issuedAt: new Date(),
    ...extra,
  };
}

const metrics: SidecarMetrics = {
  tokenRead: () => undefined,
  tokenServed: () => undefined,
  brokerReconnect: () => undefined,
  tokenEvent: () => undefined,
  refreshCall: () => undefined,
  fetchCall: () => undefined,
  exposition: () => Promise.resolve(undefined),
};

/** Round robin over `peers`, as the channel does: each new call goes to the next replica. */
function fakeApi(
  peers: string[],
  getToken: BrokerApi['getToken'] = () => Promise.reject(new Error('not used')),
) {
  const opened: FakeStream[] = [];
  let next = 0;
  const api: BrokerApi = {
    openWatch: () => {
      const stream = new FakeStream(peers[next++ % peers.length]!);
      opened.push(stream);
      return stream as unknown as ClientDuplexStream<WatchRequest, WatchResponse>;
    },
    refresh: () => Promise.reject(new Error('not used')),
    getToken,
    channelReady: () => true,
    close: () => undefined,
  };
  return { api, opened };
}

const until = async (predicate: () => boolean, what: string) => {
  const deadline = Date.now() + 3_000;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

let stop: AbortController | undefined;
afterEach(() => stop?.abort());

function link(api: BrokerApi, store: TokenStore) {
  const l = new BrokerLink(
    api,
    store,
    { reconnectBaseMs: 10, reconnectMaxMs: 20, refreshTimeoutMs: 100, refreshRetryMs: 0 },
    log,
    metrics,
  );
  stop = new AbortController();
  void l.run(stop.signal);
  return l;
}

describe('BrokerLink', () => {
  it('keeps two streams on two replicas: a silent one costs nothing, duplicates are dropped', async () => {
    const store = new TokenStore({ safetySkewMs: 1_000 });
    const { entry } = store.ensure(alice);
    const { api, opened } = fakeApi(['127.0.0.1:1', '127.0.0.1:2']);
    const l = link(api, store);
    await until(() => opened.length === 2, 'two streams');
    // Both subscribe the user, after the generation and epoch held.
    for (const s of opened)
      expect(s.written[0]?.action).toMatchObject({
        $case: 'subscribe',
        value: { ...alice, afterGeneration: 0, epoch: '' },
      });
    opened[0]!.answer(event(1));
    opened[1]!.answer(event(1));
    expect(l.peers.sort()).toEqual(['127.0.0.1:1', '127.0.0.1:2']);
    // Replica 1 freezes: it sends nothing more. Replica 2 goes on.
    opened[1]!.answer(event(2), event(3));
    expect(entry.state?.generation).toBe(3);
    // The frozen one catches up later: nothing older is taken.
    opened[0]!.answer(event(2));
    expect(entry.state?.accessToken).toBe('at-3');
    expect(l.streamsUp).toBe(2);
  });

  it('moves a stream that landed on the replica of the other one', async () => {
    const store = new TokenStore({ safetySkewMs: 1_000 });
    store.ensure(alice);
    // The first two calls reach the same replica (the other was not connected yet).
    const { api, opened } = fakeApi(['127.0.0.1:1', '127.0.0.1:1', '127.0.0.1:2']);
    const l = link(api, store);
    await until(() => opened.length === 2, 'two streams');
    opened[0]!.answer();
    opened[1]!.answer();
    await until(() => opened.length === 3, 'the shared stream reopened');
    expect(opened[1]!.cancelled).toBe(true);
    expect(opened[0]!.cancelled).toBe(false);
    opened[2]!.answer();
    expect(l.peers.sort()).toEqual(['127.0.0.1:1', '127.0.0.1:2']);
  });

  it('asks GetToken for a token near its skew, trying the next replica when one does not answer', async () => {
    const store = new TokenStore({ safetySkewMs: 1_000 });
    const { entry } = store.ensure(alice);
    let calls = 0;
    const getToken = (): Promise<GetTokenResponse> => {
      calls++;
      // The first replica is frozen: its call runs into the deadline.
      if (calls === 1)
        return Promise.reject(
          Object.assign(new Error('deadline'), { code: status.DEADLINE_EXCEEDED }),
        );
      return Promise.resolve({ token: event(8) });
    };
    const { api, opened } = fakeApi(['127.0.0.1:1', '127.0.0.1:2'], getToken);
    const l = link(api, store);
    await until(() => opened.length === 2, 'two streams');
    opened[0]!.answer(event(7));
    l.fetchCurrent(entry);
    l.fetchCurrent(entry); // coalesced
    await until(() => entry.state?.generation === 8, 'the fetched generation');
    expect(calls).toBe(2);
    // Rate-limited: another ask right after does not call again.
    l.fetchCurrent(entry);
    await new Promise((r) => setTimeout(r, 20));
    expect(calls).toBe(2);
  });

  it('a refusal is not retried on another replica', async () => {
    const store = new TokenStore({ safetySkewMs: 1_000 });
    const { entry } = store.ensure(alice);
    let calls = 0;
    const getToken = (): Promise<GetTokenResponse> => {
      calls++;
      return Promise.reject(Object.assign(new Error('denied'), { code: status.PERMISSION_DENIED }));
    };
    const { api } = fakeApi(['127.0.0.1:1'], getToken);
    const l = link(api, store);
    l.fetchCurrent(entry);
    await new Promise((r) => setTimeout(r, 20));
    expect(calls).toBe(1);
  });
});
