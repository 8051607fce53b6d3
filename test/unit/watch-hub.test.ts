import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { UnavailableError } from '../../broker/errors.js';
import type { SessionRecord } from '../../broker/store/session-record.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import { WatchHub } from '../../broker/watch-hub.js';

const log = pino({ level: 'silent' });
const REF = { tenant: 't', user: 'u' };

function record(generation: number): SessionRecord {
  return {
    ...REF,
    idp: 'default',
    generation,
    status: 'ACTIVE',
    accessToken: `at-${generation}`,
    tokenType: 'Bearer',
    accessExpiresAt: Date.now() + 60_000,
    refreshToken: `rt-${generation}`,
    refreshExpiresAt: 0,
    issuedAt: Date.now(),
    nextRefreshAt: 0,
    lastErrorCode: '',
    failedAttempts: 0,
    traceparent: '',
  };
}

function collector() {
  const seen: number[] = [];
  return { seen, deliver: (r: SessionRecord) => seen.push(r.generation) };
}

describe('WatchHub', () => {
  it('sends the current state, then only newer generations, in increasing order', async () => {
    const store = new MemorySessionStore();
    const hub = new WatchHub(store, log);
    await store.subscribe((event) => hub.onEvent(event));
    await store.commit({ next: record(1), dueAt: undefined }, null, Date.now());
    const sink = collector();
    expect(await hub.subscribe(REF, sink, 0)).toBe(true);
    await store.commit({ next: record(2), dueAt: undefined }, 1, Date.now());
    await store.commit({ next: record(3), dueAt: undefined }, 2, Date.now());
    await new Promise((r) => setTimeout(r, 20));
    // A stale event (generation 2 again) changes nothing.
    hub.onEvent({ ...REF, generation: 2 });
    await new Promise((r) => setTimeout(r, 20));
    expect(sink.seen[0]).toBe(1);
    expect(sink.seen.at(-1)).toBe(3);
    for (let i = 1; i < sink.seen.length; i++)
      expect(sink.seen[i]!).toBeGreaterThan(sink.seen[i - 1]!);
  });

  it('skips what the watcher already holds (after_generation)', async () => {
    const store = new MemorySessionStore();
    const hub = new WatchHub(store, log);
    await store.commit({ next: record(5), dueAt: undefined }, null, Date.now());
    const sink = collector();
    await hub.subscribe(REF, sink, 5);
    expect(sink.seen).toEqual([]);
  });

  it('says "not found" only when the store answered, and "unavailable" when it could not', async () => {
    const store = new MemorySessionStore();
    const hub = new WatchHub(store, log);
    expect(await hub.subscribe(REF, collector(), 0)).toBe(false);
    store.get = () => Promise.reject(new Error('connection refused'));
    const other = new WatchHub(store, log);
    await expect(other.subscribe(REF, collector(), 0)).rejects.toBeInstanceOf(UnavailableError);
  });
});
