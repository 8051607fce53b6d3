import type { Logger } from 'pino';
import { BrokerMetrics } from '../broker-metrics.js';
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

  constructor(
    private readonly options: DueWorkerOptions,
    private readonly store: DueQueue,
    private readonly rotator: Pick<Rotator, 'rotate'>,
    private readonly log: Logger,
    private readonly clock: () => number = Date.now,
    private readonly metrics: BrokerMetrics = new BrokerMetrics(),
  ) {}

  async run(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      let wait = this.options.pollIntervalMs;
      try {
        const free = this.options.concurrency - this.running.size;
        if (free > 0) {
          const now = this.clock();
          const limit = Math.min(free, this.options.batchSize);
          const claimed = await this.store.claimDue(now, limit, now + this.options.claimLeaseMs);
          for (const { ref, dueAt } of claimed) {
            this.metrics.dueLag(now - dueAt);
            const job = this.rotator
              .rotate(ref, { kind: 'due' })
              .catch(async (err: unknown) => {
                // Lock busy (another replica is on it) or lock quorum lost: look again soon. If the
                // store is down too, the claim lease brings the session back.
                this.log.debug({ tenant: ref.tenant, err: String(err) }, 'due rotation deferred');
                const retryAt =
                  this.clock() + this.options.pollIntervalMs * (4 + 4 * Math.random());
                await this.store.schedule(ref, Math.round(retryAt)).catch(() => undefined);
              })
              .finally(() => this.running.delete(job));
            this.running.add(job);
          }
          if (claimed.length === limit) wait = 0;
          else {
            const next = await this.store.nextDueAt();
            if (next !== undefined) wait = Math.max(0, Math.min(wait, next - this.clock()));
          }
        } else {
          await Promise.race(this.running);
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
