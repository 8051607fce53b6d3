import type { Logger } from 'pino';
import { BrokerMetrics } from '../broker-metrics.js';
import type { SessionRef } from '../store/session-record.js';
import type { SessionStore } from '../store/session-store.js';
import type { Rotator } from './rotator.js';

/** What the worker needs of the store: the due queue only. */
export type DueQueue = Pick<SessionStore, 'claimDue' | 'schedule' | 'nextDueAt'>;

export interface DueWorkerOptions {
  /** Longest sleep between claims when nothing is due sooner. */
  pollIntervalMs: number;
  /** Sessions claimed per round. */
  batchSize: number;
  /** Rotations this replica runs at once. */
  concurrency: number;
  /** A claimed session is hidden from other replicas this long; a crash gives it back after. */
  claimLeaseMs: number;
}

/**
 * Claims due sessions from the shared queue and rotates them. `run(signal)` stops claiming when
 * the signal aborts and resolves once this worker's rotations have finished.
 */
export class DueWorker {
  private readonly running = new Set<Promise<unknown>>();
  /** Resolves the wait for a free slot (set while the worker waits for one). */
  private slotFreed: (() => void) | undefined;

  constructor(
    private readonly options: DueWorkerOptions,
    private readonly store: DueQueue,
    private readonly rotator: Pick<Rotator, 'rotate'>,
    private readonly log: Logger,
    private readonly clock: () => number = Date.now,
    private readonly metrics: BrokerMetrics = new BrokerMetrics(),
  ) {}

  /**
   * Puts a deferred session back in the due queue a few polls from now. A store that is failing
   * over refuses that too: try again with backoff (about 8 s in all, until the signal aborts)
   * instead of leaving the session hidden for the whole claim lease.
   */
  private async reschedule(ref: SessionRef, signal: AbortSignal): Promise<void> {
    for (const backoff of RESCHEDULE_BACKOFF_MS) {
      if (backoff > 0) await sleep(backoff, signal);
      if (signal.aborted) return;
      const retryAt = this.clock() + this.options.pollIntervalMs * (4 + 4 * Math.random());
      try {
        await this.store.schedule(ref, Math.round(retryAt));
        return;
      } catch {
        // The store did not answer: next backoff step.
      }
    }
    this.log.debug({ tenant: ref.tenant }, 'could not reschedule; the claim lease will');
  }

  async run(signal: AbortSignal): Promise<void> {
    // While busy, claim once a few slots are free rather than one claim round per finished
    // rotation: each round costs the store a script or more, whatever it claims.
    const claimAt = Math.max(
      1,
      Math.min(this.options.batchSize, Math.ceil(this.options.concurrency / 4)),
    );
    while (!signal.aborted) {
      let wait = this.options.pollIntervalMs;
      try {
        const free = this.options.concurrency - this.running.size;
        if (free >= claimAt || (free > 0 && this.running.size === 0)) {
          const now = this.clock();
          const limit = Math.min(free, this.options.batchSize);
          const claimed = await this.store.claimDue(now, limit, now + this.options.claimLeaseMs);
          for (const { ref, dueAt } of claimed) {
            this.metrics.dueLag(now - dueAt);
            const job = this.rotator
              .rotate(ref, { kind: 'due' })
              .catch(async (err: unknown) => {
                // Lock busy (another replica is on it), lock quorum lost, or the store failing
                // over: look again soon.
                this.log.debug({ tenant: ref.tenant, err: String(err) }, 'due rotation deferred');
                await this.reschedule(ref, signal);
              })
              .finally(() => {
                this.running.delete(job);
                this.slotFreed?.();
              });
            this.running.add(job);
          }
          if (claimed.length === limit) wait = 0;
          else {
            const next = await this.store.nextDueAt();
            if (next !== undefined) wait = Math.max(0, Math.min(wait, next - this.clock()));
          }
        } else {
          // One waiter, woken by the next rotation to finish (no handler on every running one).
          await new Promise<void>((resolve) => (this.slotFreed = resolve));
          this.slotFreed = undefined;
          wait = 0;
        }
      } catch (err) {
        this.log.warn({ err: String(err) }, 'claiming due sessions failed; retrying');
      }
      if (wait > 0) await sleep(wait, signal);
    }
    await Promise.allSettled([...this.running]);
  }
}

/**
 * Delays between attempts to put a deferred session back in the due queue while the store does
 * not answer (a failover takes seconds). After the last one the claim lease brings it back.
 */
const RESCHEDULE_BACKOFF_MS = [0, 250, 500, 1_000, 2_000, 4_000];

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}
