import { sessionKey, type SessionRef } from '../shared/session-ref.js';

export type SessionState = 'ACTIVE' | 'REAUTH_REQUIRED' | 'REVOKED' | 'IDLE' | 'UNKNOWN';

/** One state of a session as the broker sent it (a TokenEvent). */
export interface TokenState {
  readonly generation: number;
  readonly status: SessionState;
  /** Empty when the session holds no usable access token. */
  readonly accessToken: string;
  readonly tokenType: string;
  /** Epoch ms; 0 when unknown. */
  readonly expiresAtMs: number;
  readonly errorCode: string;
  /** W3C traceparent of the rotation that produced this state ('' or absent: none). */
  readonly traceparent?: string;
  /** When this sidecar received the state (epoch ms), for the token-age metric. */
  readonly receivedAtMs?: number;
}

export interface UserEntry extends SessionRef {
  readonly key: string;
  /** The newest state seen; never replaced by an older generation. */
  state: TokenState | undefined;
  /** ISO form of `state.expiresAtMs`, computed once per state for the read path. */
  expiresAtIso: string;
  /** The broker answered SESSION_NOT_FOUND and sent no state since. */
  notFound: boolean;
  /** Listed in configuration: prefetched, never unsubscribed for idleness. */
  readonly pinned: boolean;
  lastReadAt: number;
  readonly waiters: Set<() => void>;
}

export type ApplyOutcome = 'applied' | 'stale' | 'unwatched';

export interface TokenStoreOptions {
  /** A token is served only while it has more than this left. */
  safetySkewMs: number;
  /** Called after each applied state (file sink, logs). */
  onApplied?: (entry: UserEntry) => void;
}

/**
 * The newest token per watched user. Generations only move forward: an event older than or equal
 * to the held one is dropped, whatever order replicas and reconnects deliver them in.
 */
export class TokenStore {
  private readonly entries = new Map<string, UserEntry>();
  private readonly clock: () => number;

  constructor(
    private readonly options: TokenStoreOptions,
    clock: () => number = Date.now,
  ) {
    this.clock = clock;
  }

  get size(): number {
    return this.entries.size;
  }

  get safetySkewMs(): number {
    return this.options.safetySkewMs;
  }

  get(tenant: string, user: string): UserEntry | undefined {
    return this.entries.get(sessionKey(tenant, user));
  }

  /** The user's entry, created when missing (`created` tells the caller to subscribe). */
  ensure(ref: SessionRef, pinned = false): { entry: UserEntry; created: boolean } {
    const key = sessionKey(ref.tenant, ref.user);
    const existing = this.entries.get(key);
    if (existing) return { entry: existing, created: false };
    const entry: UserEntry = {
      tenant: ref.tenant,
      user: ref.user,
      key,
      state: undefined,
      expiresAtIso: '',
      notFound: false,
      pinned,
      lastReadAt: this.clock(),
      waiters: new Set(),
    };
    this.entries.set(key, entry);
    return { entry, created: true };
  }

  /** Takes `state` for the user if it is newer than the held one. */
  apply(ref: SessionRef, state: TokenState): ApplyOutcome {
    const entry = this.entries.get(sessionKey(ref.tenant, ref.user));
    if (!entry) return 'unwatched';
    if (entry.state && state.generation <= entry.state.generation) return 'stale';
    entry.state = state;
    entry.expiresAtIso = state.expiresAtMs > 0 ? new Date(state.expiresAtMs).toISOString() : '';
    entry.notFound = false;
    this.options.onApplied?.(entry);
    this.wake(entry);
    return 'applied';
  }

  /** The broker has no such session (yet); it sends the first state once the user is enrolled. */
  markNotFound(ref: SessionRef): void {
    const entry = this.entries.get(sessionKey(ref.tenant, ref.user));
    if (!entry || entry.state) return;
    entry.notFound = true;
    this.wake(entry);
  }

  remove(entry: UserEntry): void {
    this.entries.delete(entry.key);
    this.wake(entry);
  }

  all(): IterableIterator<UserEntry> {
    return this.entries.values();
  }

  /** Unpinned entries not read since `now - idleMs`. */
  idleSince(idleMs: number): UserEntry[] {
    const cutoff = this.clock() - idleMs;
    return [...this.entries.values()].filter((e) => !e.pinned && e.lastReadAt < cutoff);
  }

  /** True when the entry holds an active token with more than the safety skew left. */
  isFresh(entry: UserEntry, now = this.clock()): boolean {
    const state = entry.state;
    return (
      state !== undefined &&
      state.status === 'ACTIVE' &&
      state.accessToken !== '' &&
      state.expiresAtMs - now > this.options.safetySkewMs
    );
  }

  /** Resolves on the entry's next change or after `timeoutMs`, whichever comes first. */
  waitForChange(entry: UserEntry, timeoutMs: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        entry.waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, timeoutMs));
      entry.waiters.add(done);
    });
  }

  /** Wakes every waiter (shutdown). */
  wakeAll(): void {
    for (const entry of this.entries.values()) this.wake(entry);
  }

  private wake(entry: UserEntry): void {
    for (const waiter of [...entry.waiters]) waiter();
  }
}
