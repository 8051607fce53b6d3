/** A lock held by the caller. */
export interface HeldLock {
  /** Aborts when exclusivity can no longer be guaranteed (an extension failed). */
  readonly signal: AbortSignal;
  /** Epoch ms until which the lock is surely held (drift already subtracted); 0 once lost. */
  validUntil(): number;
}

/** One exclusive lock per resource across every broker replica. */
export interface LockService {
  /**
   * Runs `fn` while holding the lock on `resource`; the lock is extended while `fn` runs and
   * released afterwards. Throws LockUnavailableError when it cannot be taken.
   */
  withLock<T>(resource: string, fn: (lock: HeldLock) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}
