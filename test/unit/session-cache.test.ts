import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { SessionInactiveError } from '../../broker/errors.js';
import { CacheInvalidatingStore, SessionCache } from '../../broker/session-cache.js';
import { SessionService, type SessionServiceDeps } from '../../broker/session-service.js';
import { KeySpace } from '../../broker/store/keys.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import type {
  SessionEvent,
  SessionRecord,
  SessionRef,
  StoredSession,
} from '../../broker/store/session-record.js';

const REF = { tenant: 't', user: 'u' };
const NOW = 1_000_000;

function record(generation: number, extra: Partial<SessionRecord> = {}): SessionRecord {
  return {
    ...REF,
    idp: 'default',
    generation,
    status: 'ACTIVE',
    accessToken: `at-${generation}`,
    tokenType: 'Bearer',
    accessExpiresAt: NOW + 60_000,
    refreshToken: `rt-${generation}`,
    refreshExpiresAt: 0,
    issuedAt: NOW,
    nextRefreshAt: NOW + 45_000,
    lastErrorCode: '',
    failedAttempts: 0,
    traceparent: '',
    epoch: 'e1',
    ...extra,
  };
}

/** A fake store: records by session id; reads can be held open to interleave events. */
class FakeStore {
  readonly records = new Map<string, SessionRecord>();
  gets = 0;
  touches: number[] = [];
  private held: (() => void)[] | undefined;

  put(r: SessionRecord): void {
    this.records.set(KeySpace.sessionId(r), r);
  }
  /** Reads wait from now until release(). */
  hold(): void {
    this.held = [];
  }
  release(): void {
    const waiting = this.held ?? [];
    this.held = undefined;
    waiting.forEach((go) => go());
  }
  async get(ref: SessionRef): Promise<StoredSession | undefined> {
    this.gets++;
    // The value as of the read's start, as a store answers what it held when asked.
    const r = this.records.get(KeySpace.sessionId(ref));
    if (this.held) await new Promise<void>((go) => this.held!.push(go));
    return r && { record: structuredClone(r), lastUsedAt: NOW, inflight: undefined };
  }
  commit(): Promise<boolean> {
    return Promise.resolve(true);
  }
  touch(_ref: SessionRef, now: number): Promise<void> {
    this.touches.push(now);
    return Promise.resolve();
  }
  list(): Promise<never> {
    return Promise.reject(new Error('not used'));
  }
}

function setUp(options = { maxEntries: 100, maxAgeMs: 10_000 }) {
  let now = NOW;
  const clock = () => now;
  const store = new FakeStore();
  const cache = new SessionCache(options, clock);
  const reads: string[] = [];
  const service = new SessionService(
    { defaultIdp: 'default', refreshMinIntervalMs: 0, refreshWaitMs: 0, touchIntervalMs: 1_000 },
    {
      store,
      cache,
      countRead: (result: string) => reads.push(result),
      clock,
      log: pino({ level: 'silent' }),
    } as unknown as SessionServiceDeps,
  );
  return { store, cache, service, reads, advance: (ms: number) => (now += ms) };
}

const event = (generation: number, epoch = 'e1'): SessionEvent => ({ ...REF, generation, epoch });

describe('SessionCache behind GetToken', () => {
  it('reads the store once, then answers from memory without the refresh token', async () => {
    const { store, service, reads } = setUp();
    store.put(record(3));
    expect((await service.getToken(REF)).refreshToken).toBe('rt-3');
    const hit = await service.getToken(REF);
    expect(hit.generation).toBe(3);
    expect(hit.accessToken).toBe('at-3');
    expect(hit.refreshToken).toBe('');
    expect(hit.login).toBeUndefined();
    expect(store.gets).toBe(1);
    expect(reads).toEqual(['miss', 'hit']);
  });

  it('forgets a session on an event for a newer generation, keeps it for the one it holds', async () => {
    const { store, cache, service } = setUp();
    store.put(record(3));
    await service.getToken(REF);
    cache.onEvent(event(3));
    await service.getToken(REF);
    expect(store.gets).toBe(1);
    store.put(record(4));
    cache.onEvent(event(4));
    expect((await service.getToken(REF)).generation).toBe(4);
    expect(store.gets).toBe(2);
  });

  it('forgets a session on an event of another epoch, even at the same generation', async () => {
    const { store, cache, service } = setUp();
    store.put(record(1));
    await service.getToken(REF);
    store.put(record(1, { epoch: 'e2', accessToken: 'at-new-epoch' }));
    cache.onEvent(event(1, 'e2'));
    expect((await service.getToken(REF)).accessToken).toBe('at-new-epoch');
    expect(store.gets).toBe(2);
  });

  it('does not keep a read that an event overtook while it was in flight', async () => {
    const { store, cache, service } = setUp();
    store.put(record(3));
    store.hold();
    const reading = service.getToken(REF);
    store.put(record(4));
    cache.onEvent(event(4)); // the read above may have seen generation 3
    store.release();
    expect((await reading).generation).toBe(3); // that caller asked before the event
    expect((await service.getToken(REF)).generation).toBe(4);
    expect(store.gets).toBe(2);
    expect((await service.getToken(REF)).generation).toBe(4);
    expect(store.gets).toBe(2);
  });

  it('serves nothing while the event stream is down, and only fresh reads once it is back', async () => {
    const { store, cache, service, reads } = setUp();
    store.put(record(3));
    await service.getToken(REF);
    store.hold();
    const before = service.getToken({ ...REF, user: 'other' }).catch(() => undefined);
    cache.down();
    store.release();
    await before;
    store.put(record(5));
    expect((await service.getToken(REF)).generation).toBe(5);
    expect((await service.getToken(REF)).generation).toBe(5);
    expect(cache.size).toBe(0);
    expect(reads.slice(1)).toEqual(['miss', 'miss', 'miss']);
    cache.up();
    await service.getToken(REF);
    await service.getToken(REF);
    expect(reads.slice(-2)).toEqual(['miss', 'hit']);
  });

  it('keeps no session that is not ACTIVE with a token, and reads again once the token expired', async () => {
    const { store, service, advance } = setUp({ maxEntries: 100, maxAgeMs: 1e9 });
    store.put(record(3, { status: 'REVOKED' }));
    await expect(service.getToken(REF)).rejects.toBeInstanceOf(SessionInactiveError);
    await expect(service.getToken(REF)).rejects.toBeInstanceOf(SessionInactiveError);
    expect(store.gets).toBe(2);
    store.put(record(4));
    await service.getToken(REF);
    await service.getToken(REF);
    expect(store.gets).toBe(3);
    advance(60_000); // the cached token's expiry: the store is asked (and a rotation would follow)
    store.put(record(5, { accessExpiresAt: NOW + 120_000 }));
    expect((await service.getToken(REF)).generation).toBe(5);
    expect(store.gets).toBe(4);
  });

  it('keeps recording uses on hits, at most once per touch interval', async () => {
    const { store, service, advance } = setUp();
    store.put(record(3));
    await service.getToken(REF);
    await service.getToken(REF);
    expect(store.touches).toEqual([NOW]);
    advance(1_500);
    await service.getToken(REF);
    expect(store.touches).toEqual([NOW, NOW + 1_500]);
    expect(store.gets).toBe(1);
  });

  it('holds at most maxEntries, dropping the least recently read, and none older than maxAgeMs', async () => {
    const { store, cache, service, advance } = setUp({ maxEntries: 2, maxAgeMs: 5_000 });
    const refs = ['a', 'b', 'c'].map((user) => ({ tenant: 't', user }));
    for (const ref of refs) store.put({ ...record(1), ...ref });
    await service.getToken(refs[0]!);
    await service.getToken(refs[1]!);
    await service.getToken(refs[0]!); // a is now the most recently read
    await service.getToken(refs[2]!); // evicts b
    expect(cache.size).toBe(2);
    expect(store.gets).toBe(3);
    await service.getToken(refs[0]!);
    await service.getToken(refs[2]!);
    expect(store.gets).toBe(3);
    await service.getToken(refs[1]!);
    expect(store.gets).toBe(4);
    advance(5_001);
    await service.getToken(refs[1]!);
    expect(store.gets).toBe(5);
  });
});

describe('CacheInvalidatingStore', () => {
  it('forgets the session around each commit of this replica, before its event arrives', async () => {
    const memory = new MemorySessionStore();
    const cache = new SessionCache();
    const store = new CacheInvalidatingStore(memory, cache);
    await store.commit({ next: record(1), dueAt: undefined }, null, NOW);
    const load = cache.begin(REF);
    const read = (await store.get(REF))!.record;
    cache.end(load, read);
    expect(cache.get(REF)?.generation).toBe(1);
    // A read in flight across a commit is not kept either.
    const across = cache.begin(REF);
    await store.commit({ next: record(2), dueAt: undefined }, 1, NOW);
    expect(cache.get(REF)).toBeUndefined();
    cache.end(across, read);
    expect(cache.get(REF)).toBeUndefined();
    await store.close();
  });
});
