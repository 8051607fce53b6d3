import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { UnavailableError } from '../../broker/errors.js';
import type { SessionRecord } from '../../broker/store/session-record.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import { Delivery, WatchHub } from '../../broker/watch-hub.js';

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

  it('a new epoch reaches a watcher at once, even with a lower generation (enrolled again)', async () => {
    const store = new MemorySessionStore();
    const hub = new WatchHub(store, log);
    await store.subscribe((event) => hub.onEvent(event));
    await store.commit({ next: { ...record(500), epoch: 'old' }, dueAt: undefined }, null, 0);
    const live = collector();
    await hub.subscribe(REF, live, 0, '');
    // A sidecar reconnecting while holding generation 500 of the old epoch gets nothing new...
    const resumed = collector();
    await hub.subscribe(REF, resumed, 500, 'old');
    expect([live.seen, resumed.seen]).toEqual([[500], []]);
    // ...until the state is lost and the user enrolled again: generation 1 of a new epoch.
    (store as unknown as { sessions: Map<string, unknown> }).sessions.clear();
    await store.commit({ next: { ...record(1), epoch: 'new' }, dueAt: undefined }, null, 0);
    await new Promise((r) => setTimeout(r, 20));
    expect(live.seen).toEqual([500, 1]);
    expect(resumed.seen).toEqual([1]);
    // Within the new epoch the generation order holds again.
    await store.commit({ next: { ...record(2), epoch: 'new' }, dueAt: undefined }, 1, 0);
    await new Promise((r) => setTimeout(r, 20));
    expect(live.seen).toEqual([500, 1, 2]);
    // A sidecar that subscribes holding generation 900 of the old epoch gets the new state.
    const late = collector();
    await hub.subscribe(REF, late, 900, 'old');
    expect(late.seen).toEqual([2]);
    // A record written before epochs existed compares by generation only.
    const legacy = new MemorySessionStore();
    const legacyHub = new WatchHub(legacy, log);
    await legacy.commit({ next: record(7), dueAt: undefined }, null, 0);
    const held = collector();
    await legacyHub.subscribe(REF, held, 7, '');
    expect(held.seen).toEqual([]);
  });

  it('hands every sink of one fan-out the same Delivery, which derives once', async () => {
    const store = new MemorySessionStore();
    const hub = new WatchHub(store, log);
    await store.subscribe((event) => hub.onEvent(event));
    await store.commit({ next: record(1), dueAt: undefined }, null, Date.now());
    const key = Symbol('derived');
    let derivations = 0;
    const got: { sink: number; generation: number; derived: string; delivery: Delivery }[] = [];
    const sinks = [0, 1, 2].map((n) => ({
      deliver: (r: SessionRecord, delivery: Delivery) =>
        got.push({
          sink: n,
          generation: r.generation,
          delivery,
          derived: delivery.once(key, (rec) => `g${rec.generation}#${++derivations}`),
        }),
    }));
    for (const sink of sinks) await hub.subscribe(REF, sink, 1);
    await store.commit({ next: record(2), dueAt: undefined }, 1, Date.now());
    await new Promise((r) => setTimeout(r, 20));
    expect(got.map((g) => [g.sink, g.generation, g.derived])).toEqual([
      [0, 2, 'g2#1'],
      [1, 2, 'g2#1'],
      [2, 2, 'g2#1'],
    ]);
    expect(new Set(got.map((g) => g.delivery)).size).toBe(1);
    // The next fan-out derives anew: nothing derived outlives its record.
    await store.commit({ next: record(3), dueAt: undefined }, 2, Date.now());
    await new Promise((r) => setTimeout(r, 20));
    expect(got.slice(3).map((g) => g.derived)).toEqual(['g3#2', 'g3#2', 'g3#2']);
  });

  it('an event with an empty epoch is no other epoch: an old generation reloads nothing', async () => {
    const store = new MemorySessionStore();
    const hub = new WatchHub(store, log);
    await store.commit({ next: { ...record(4), epoch: 'e1' }, dueAt: undefined }, null, 0);
    await hub.subscribe(REF, collector(), 0);
    let reads = 0;
    const get = store.get.bind(store);
    store.get = (ref) => {
      reads++;
      return get(ref);
    };
    hub.onEvent({ ...REF, generation: 3, epoch: '' });
    hub.onEvent({ ...REF, generation: 4 });
    await new Promise((r) => setTimeout(r, 20));
    expect(reads).toBe(0);
    // Another epoch, or a newer generation, is news.
    hub.onEvent({ ...REF, generation: 1, epoch: 'e2' });
    await new Promise((r) => setTimeout(r, 20));
    expect(reads).toBe(1);
  });
});
