import { Redis } from 'ioredis';
import { Redlock } from '@sesamecare-oss/redlock';
import type { Logger } from 'pino';
import { autoPipeliningAllowed } from '../store/auto-pipelining.js';
import { inSpan } from '../../shared/telemetry/spans.js';
import { type HeldLock, type LockService } from './lock-service.js';
import { LockUnavailableError } from '../errors.js';

export interface RedlockOptions {
  /** URLs of independent Redis nodes; a majority must agree for a lock. */
  urls: string[];
  ttlMs: number;
  /** Extend when less than this is left; the signal aborts if an extension fails by then. */
  extendBeforeMs: number;
  retryCount: number;
  retryDelayMs: number;
  /** Per-command timeout on lock nodes, so a dead node costs this much, not a hang. */
  commandTimeoutMs: number;
}

/** Redlock over N independent Redis nodes (the maintained @sesamecare-oss/redlock). */
export class RedlockLockService implements LockService {
  private readonly clients: Redis[];
  private readonly redlock: Redlock;

  constructor(
    private readonly options: RedlockOptions,
    private readonly log: Logger,
  ) {
    this.clients = options.urls.map((url) => {
      const client = new Redis(url, {
        // Fail fast while a node is down instead of queueing: the quorum decides, not the queue.
        enableOfflineQueue: false,
        maxRetriesPerRequest: 0,
        // The acquires and releases of the rotations in flight share one write per node.
        enableAutoPipelining: autoPipeliningAllowed(),
        commandTimeout: options.commandTimeoutMs,
        retryStrategy: (attempt) => Math.min(1000, 50 * attempt),
      });
      client.on('error', (err: Error) =>
        log.debug({ err: err.message, node: url }, 'lock node error'),
      );
      return client;
    });
    this.redlock = new Redlock(this.clients, {
      driftFactor: 0.01,
      retryCount: options.retryCount,
      retryDelay: options.retryDelayMs,
      retryJitter: options.retryDelayMs,
      automaticExtensionThreshold: options.extendBeforeMs,
    });
    this.redlock.on('error', () => {
      // Per-node failures are expected while a node is down; quorum failures surface as throws.
    });
  }

  /**
   * Waits until a quorum of lock nodes is connected (commands fail fast rather than queue, so the
   * first rotations after start-up would otherwise fail). Returns how many nodes are ready.
   */
  waitForQuorum(timeoutMs: number): Promise<number> {
    const quorum = Math.floor(this.clients.length / 2) + 1;
    const ready = () => this.clients.filter((c) => c.status === 'ready').length;
    if (ready() >= quorum) return Promise.resolve(ready());
    // Each node's 'ready' is checked as it comes, so start-up waits for the quorum, not a poll.
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        for (const c of this.clients) c.off('ready', onReady);
        resolve(ready());
      };
      const onReady = () => {
        if (ready() >= quorum) done();
      };
      const timer = setTimeout(done, timeoutMs);
      timer.unref();
      for (const c of this.clients) c.on('ready', onReady);
    });
  }

  async withLock<T>(resource: string, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
    // Spans name no resource: the lock key names the user.
    const nodes = { 'tb.lock.nodes': this.clients.length };
    const lock = await inSpan('lock.acquire', nodes, async () => {
      try {
        return await this.redlock.acquire([resource], this.options.ttlMs);
      } catch (err) {
        throw new LockUnavailableError('lock is held elsewhere or no quorum of lock nodes', {
          detail: (err as Error).message,
          cause: err,
        });
      }
    });
    const controller = new AbortController();
    let current = lock;
    let timer: NodeJS.Timeout | undefined;
    let extension: Promise<void> | undefined;
    const schedule = () => {
      const wait = current.expiration - Date.now() - this.options.extendBeforeMs;
      timer = setTimeout(
        () => {
          extension = inSpan('lock.extend', nodes, () => current.extend(this.options.ttlMs)).then(
            (next) => {
              current = next;
              schedule();
            },
            (err: unknown) => {
              current.expiration = 0;
              controller.abort(
                new LockUnavailableError('lock extension failed', { detail: String(err) }),
              );
            },
          );
        },
        Math.max(0, wait),
      );
    };
    schedule();
    const held: HeldLock = { signal: controller.signal, validUntil: () => current.expiration };
    try {
      return await fn(held);
    } finally {
      clearTimeout(timer);
      await extension?.catch(() => undefined);
      // A failed release only means the lock lapses by its TTL; the work is done either way.
      await inSpan('lock.release', nodes, () => current.release()).catch((err: unknown) => {
        this.log.debug({ err: String(err), resource }, 'lock release failed; it will expire');
      });
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.quit().catch(() => c.disconnect())));
  }
}
