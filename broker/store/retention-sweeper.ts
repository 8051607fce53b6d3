import type { Logger } from 'pino';
import type { SessionStore } from './session-store.js';

export interface RetentionOptions {
  /** REVOKED, REAUTH_REQUIRED and IDLE sessions older than this are deleted. */
  retentionMs: number;
  /** Sessions deleted per sweep at most (each sweep is bounded; a full one is followed soon). */
  batchSize: number;
  /** Pause between sweeps when the last one was not full. */
  intervalMs: number;
}

/** Defaults: one bounded batch a minute (sooner while there is a backlog), or more often for short retentions. */
export function retentionOptions(retentionMs: number): RetentionOptions {
  return {
    retentionMs,
    batchSize: 500,
    intervalMs: Math.min(60_000, Math.max(1_000, Math.round(retentionMs / 10))),
  };
}

/**
 * Deletes dead sessions once they are old enough, in bounded batches. Every replica runs one; the
 * store's sweep is idempotent, so two replicas sweeping at once delete each session once.
 * `run(signal)` resolves once the signal aborts.
 */
export class RetentionSweeper {
  constructor(
    private readonly options: RetentionOptions,
    private readonly store: Pick<SessionStore, 'sweepDead'>,
    private readonly log: Logger,
    private readonly clock: () => number = Date.now,
  ) {}

  /** One bounded sweep; returns how many sessions it deleted. */
  async sweepOnce(): Promise<number> {
    const deleted = await this.store.sweepDead(
      this.clock() - this.options.retentionMs,
      this.options.batchSize,
    );
    if (deleted > 0)
      this.log.info(
        { deleted, retentionMs: this.options.retentionMs },
        'deleted sessions dead for longer than TB_SESSION_RETENTION_MS',
      );
    return deleted;
  }

  async run(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      let wait = this.options.intervalMs;
      try {
        if ((await this.sweepOnce()) >= this.options.batchSize) wait = 100;
      } catch (err) {
        this.log.warn(
          { err: String(err) },
          'retention sweep failed; retrying at the next interval',
        );
      }
      // An abort during the sweep has fired already: do not wait for an event that is past.
      if (signal.aborted) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, wait);
        function done() {
          clearTimeout(timer);
          signal.removeEventListener('abort', done);
          resolve();
        }
        signal.addEventListener('abort', done, { once: true });
      });
    }
  }
}
