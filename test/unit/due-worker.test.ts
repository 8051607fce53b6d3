import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { DueWorker, type DueQueue } from '../../broker/rotation/due-worker.js';
import type { SessionRef } from '../../broker/store/session-record.js';
import type { DueClaim } from '../../broker/store/session-store.js';

const REF: SessionRef = { tenant: 'diku', user: 'alice' };
const log = pino({ level: 'silent' });
const options = { pollIntervalMs: 10, batchSize: 8, concurrency: 4, claimLeaseMs: 60_000 };

/** A due queue that hands out one claim, then nothing; `schedule` fails `failures` times. */
function queue(failures: number) {
  const scheduled: number[] = [];
  let scheduleCalls = 0;
  let claimed = false;
  const store: DueQueue = {
    claimDue(): Promise<DueClaim[]> {
      if (claimed) return Promise.resolve([]);
      claimed = true;
      return Promise.resolve([{ ref: REF, dueAt: Date.now() }]);
    },
    schedule(_ref: SessionRef, at: number): Promise<void> {
      scheduleCalls++;
      if (scheduleCalls <= failures) return Promise.reject(new Error('state store unavailable'));
      scheduled.push(at);
      return Promise.resolve();
    },
    nextDueAt: () => Promise.resolve(undefined),
  };
  return { store, scheduled, calls: () => scheduleCalls };
}

const failingRotator = {
  rotate: () => Promise.reject(new Error('state store unavailable (failing over)')),
};

async function until(predicate: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('DueWorker', () => {
  it('puts a deferred session back in the due queue once the store answers again', async () => {
    const q = queue(2);
    const worker = new DueWorker(options, q.store, failingRotator, log);
    const stop = new AbortController();
    const running = worker.run(stop.signal);
    await until(() => q.scheduled.length === 1, 'the session rescheduled');
    stop.abort();
    await running;
    // Two refusals, then the third attempt lands: soon (a few polls), not after the lease.
    expect(q.calls()).toBe(3);
    expect(q.scheduled[0]!).toBeLessThan(Date.now() + 60_000);
    expect(q.scheduled[0]!).toBeGreaterThanOrEqual(Date.now() - 1_000);
  });

  it('stops retrying when it is stopped, and leaves the session to the claim lease', async () => {
    const q = queue(Number.POSITIVE_INFINITY);
    const worker = new DueWorker(options, q.store, failingRotator, log);
    const stop = new AbortController();
    const running = worker.run(stop.signal);
    await until(() => q.calls() >= 2, 'two refused reschedules');
    stop.abort();
    await running;
    const atStop = q.calls();
    await new Promise((r) => setTimeout(r, 600));
    // No attempt after the stop (the next backoff step would have come by now).
    expect(q.calls()).toBe(atStop);
    expect(q.scheduled).toEqual([]);
  });
});
