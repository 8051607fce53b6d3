import { inSpan } from '../../shared/telemetry/spans.js';
import { type HeldLock, type LockService } from './lock-service.js';
import { LockUnavailableError } from '../errors.js';

/** Embedded mode: an in-process lock per resource, for a single replica. */
export class MemoryLockService implements LockService {
  private readonly tails = new Map<string, Promise<void>>();

  constructor(private readonly waitMs: number) {}

  async withLock<T>(resource: string, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
    const previous = this.tails.get(resource) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => (release = resolve));
    const tail = previous.then(() => mine);
    this.tails.set(resource, tail);
    try {
      await inSpan('lock.acquire', { 'tb.lock.nodes': 0 }, async () => {
        let timer: NodeJS.Timeout | undefined;
        const timedOut = new Promise<'timeout'>((resolve) => {
          timer = setTimeout(() => resolve('timeout'), this.waitMs);
        });
        const got = await Promise.race([previous.then(() => 'acquired' as const), timedOut]);
        clearTimeout(timer);
        if (got === 'timeout') throw new LockUnavailableError('lock is held by another rotation');
      });
      const signal = new AbortController().signal;
      return await fn({ signal, validUntil: () => Number.MAX_SAFE_INTEGER });
    } finally {
      release();
      if (this.tails.get(resource) === tail) this.tails.delete(resource);
    }
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}
