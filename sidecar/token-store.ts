import { sessionKey, type SessionRef } from '../shared/session-ref.js';

export type SessionState = 'ACTIVE' | 'REAUTH_REQUIRED' | 'REVOKED' | 'IDLE' | 'UNKNOWN';

/** One state of a session as the broker sent it (a TokenEvent). */
export interface TokenState {
  /** The enrollment the generation counts in ('' from brokers that predate epochs). */
  readonly epoch: string;
  readonly generation: number;
  readonly status: SessionState;
  /** Empty when the session holds no usable access token. */
  readonly accessToken: string;
  readonly tokenType: string;
  /** Epoch ms; 0 when unknown. */
  readonly expiresAtMs: number;
  /** When the broker obtained the token (epoch ms, broker clock); 0 when not sent. */
  readonly issuedAtMs?: number;
  readonly errorCode: string;
  /** W3C traceparent of the rotation that produced this state ('' or absent: none). */
  readonly traceparent?: string;
  /** When this sidecar received the state (epoch ms), for the token-age metric. */
  readonly receivedAtMs?: number;
}

export interface UserEntry extends SessionRef {
  readonly key: string;
  /** The newest state seen; never replaced by an older generation of its epoch. */
  state: TokenState | undefined;
  /** Epochs this entry moved away from (newest last, a few): their states are never taken again. */
  retiredEpochs: string[];
  /** The safety skew that applies to `state` (see `TokenStore.skewFor`). */
  skewMs: number;
  /** Lifetime (whole seconds) the last shrink warning was about; -1: none. */
  shrinkWarnedLifetimeS: number;
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
  /** A token is served only while it has more than this left (or less: see `skewFor`). */
  safetySkewMs: number;
  /** Called after each applied state (file sink, logs). */
  onApplied?: (entry: UserEntry) => void;
  /** Called when a user's tokens live too briefly for the configured skew (once per lifetime). */
  onSkewShrunk?: (entry: UserEntry, skew: EffectiveSkew) => void;
}

/** The largest part of a token's lifetime the safety skew may take. */
const MAX_SKEW_FRACTION = 0.25;
/** Retired epochs remembered per user: enough for re-enrollments racing a lagging replica. */
const RETIRED_EPOCHS_KEPT = 8;

/** The skew that applies to a token, and whether its short lifetime made it smaller. */
export interface EffectiveSkew {
  skewMs: number;
  configuredMs: number;
  /** The token's lifetime (ms), when known. */
  lifetimeMs: number | undefined;
  shrunk: boolean;
}

/** The token's lifetime: issued to expiry on the broker's clock, else from receipt here. */
function lifetimeOf(state: TokenState): number | undefined {
  if (state.expiresAtMs <= 0) return undefined;
  const from = state.issuedAtMs && state.issuedAtMs > 0 ? state.issuedAtMs : state.receivedAtMs;
  if (from === undefined || from <= 0 || state.expiresAtMs <= from) return undefined;
  return state.expiresAtMs - from;
}

/**
 * The newest token per watched user. Within an epoch generations only move forward: an event
 * older than or equal to the held one is dropped, whatever order replicas, duplicate streams and
 * reconnects deliver them in. A state of a new epoch (the user was enrolled again, maybe after
 * the broker's state was lost and generations restarted) replaces the held one at once, and the
 * old epoch is retired so a lagging replica cannot bring it back.
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
      retiredEpochs: [],
      skewMs: this.options.safetySkewMs,
      shrinkWarnedLifetimeS: -1,
      notFound: false,
      pinned,
      lastReadAt: this.clock(),
      waiters: new Set(),
    };
    this.entries.set(key, entry);
    return { entry, created: true };
  }

  /** Takes `state` for the user if it is newer than the held one (see the class comment). */
  apply(ref: SessionRef, state: TokenState): ApplyOutcome {
    const entry = this.entries.get(sessionKey(ref.tenant, ref.user));
    if (!entry) return 'unwatched';
    const held = entry.state;
    let taken = state;
    if (held) {
      if (state.epoch === '' || state.epoch === held.epoch) {
        if (state.generation <= held.generation) return 'stale';
        // A broker that predates epochs names none: the state stays in the epoch held.
        if (state.epoch !== held.epoch) taken = { ...state, epoch: held.epoch };
      } else {
        if (entry.retiredEpochs.includes(state.epoch)) return 'stale';
        if (held.epoch !== '') {
          entry.retiredEpochs.push(held.epoch);
          if (entry.retiredEpochs.length > RETIRED_EPOCHS_KEPT) entry.retiredEpochs.shift();
        }
      }
    }
    entry.state = taken;
    entry.expiresAtIso = taken.expiresAtMs > 0 ? new Date(taken.expiresAtMs).toISOString() : '';
    entry.notFound = false;
    const skew = this.skewFor(taken);
    entry.skewMs = skew.skewMs;
    // Once per user and lifetime, not per state: a rotation every few seconds would flood.
    const lifetimeS = Math.round((skew.lifetimeMs ?? 0) / 1000);
    if (skew.shrunk && entry.shrinkWarnedLifetimeS !== lifetimeS) {
      entry.shrinkWarnedLifetimeS = lifetimeS;
      this.options.onSkewShrunk?.(entry, skew);
    }
    this.options.onApplied?.(entry);
    this.wake(entry);
    return 'applied';
  }

  /**
   * The configured safety skew, or a quarter of the token's lifetime when that is smaller: a
   * token living 6 s is then served until 1.5 s before expiry instead of never (skew 10 s).
   */
  skewFor(state: TokenState): EffectiveSkew {
    const configuredMs = this.options.safetySkewMs;
    const lifetimeMs = lifetimeOf(state);
    const capMs = lifetimeMs === undefined ? Infinity : Math.floor(lifetimeMs * MAX_SKEW_FRACTION);
    return capMs < configuredMs
      ? { skewMs: capMs, configuredMs, lifetimeMs, shrunk: true }
      : { skewMs: configuredMs, configuredMs, lifetimeMs, shrunk: false };
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

  /** True when the entry holds an active token with more than its safety skew left. */
  isFresh(entry: UserEntry, now = this.clock()): boolean {
    const state = entry.state;
    return (
      state !== undefined &&
      state.status === 'ACTIVE' &&
      state.accessToken !== '' &&
      state.expiresAtMs - now > entry.skewMs
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
