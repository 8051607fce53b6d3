import { randomUUID } from 'node:crypto';
import { trace, type Span } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { ATTR, userHash } from '../../shared/telemetry/span-attributes.js';
import { inSpan, markFailed } from '../../shared/telemetry/spans.js';
import { currentTraceparent } from '../../shared/telemetry/trace-context.js';
import { BrokerMetrics } from '../broker-metrics.js';
import { type IdpAdapter, type IdpContext, type TokenSet } from '../idp/idp-adapter.js';
import { type LoginSecrets } from '../idp/login-secrets.js';
import { type LockService, type HeldLock } from '../lock/lock-service.js';
import { dueWithLoginAhead, loginAheadAt, type RotationPolicy } from './rotation-policy.js';
import {
  familyForgotten,
  idle,
  reauthRequired,
  retryScheduled,
  rotated,
  type Transition,
} from '../session-transitions.js';
import { KeySpace } from '../store/keys.js';
import {
  errorCode,
  IdpInvalidClientError,
  IdpInvalidGrantError,
  IdpLoginRejectedError,
  IdpTokenConsumedError,
  IdpTransientError,
  LockUnavailableError,
  LoginSecretError,
} from '../errors.js';
import type { RefreshIntrospection } from '../idp/idp-profiles.js';
import { IntrospectionProbes } from './introspection-probe.js';
import { errorText } from '../redaction.js';
import type { SessionRecord, SessionRef, StoredSession } from '../store/session-record.js';
import type { MarkResult, SessionStore } from '../store/session-store.js';
import { presentationGate, type RotationDemand } from './presentation-gate.js';

export type { RotationDemand };

export type RotationOutcome =
  | 'rotated'
  /** Another rotation already moved the generation, or the session is not due yet. */
  | 'not-needed'
  | 'reauth-required'
  /** A transient failure; a retry is scheduled. */
  | 'retry-scheduled'
  /** An earlier presentation may still be in flight; the session is rescheduled after it. */
  | 'busy'
  /** Not active (revoked, idle, reauth): nothing to rotate. */
  | 'inactive'
  | 'went-idle'
  | 'not-found'
  /** The IdP answered but the new pair could not be stored. */
  | 'persist-failed';

export interface RotationResult {
  outcome: RotationOutcome;
  /** The session as stored after this rotation attempt (undefined when not found). */
  record: SessionRecord | undefined;
  errorCode?: string;
  retryAfterMs?: number;
}

export interface RotatorOptions {
  replica: string;
  /**
   * The longest connecting and sending a call may take (TB_IDP_TIMEOUT_MS): it must fit in the
   * lock's validity. Once sent, the answer is awaited (the adapter's answer wait bounds it) while
   * the lock is extended; only a lost lock aborts it.
   */
  idpTimeoutMs: number;
  /** Kept between the IdP deadline and the lock's end: the call never outlives the lock. */
  lockMarginMs: number;
  /** A session unread and unwatched this long stops being refreshed. */
  idleTimeoutMs: number;
  /** Delay before retrying a session whose lock was busy. */
  busyRetryMs: number;
  /**
   * How long to keep retrying the store after the IdP answered (default 30 s). The lock is held
   * and extended meanwhile, so no one else presents the now-consumed refresh token.
   */
  persistRetryMs?: number;
  /**
   * For sessions enrolled with a login: how many times in a row the broker logs in again after
   * invalid_grant without a successful refresh in between (default 3). Past it: REAUTH_REQUIRED.
   */
  maxRelogins?: number;
  /**
   * For sessions enrolled with a login: log in again this long before the family's known end
   * (refreshExpiresAt), instead of waiting for the IdP's invalid_grant (default 5 min).
   */
  loginAheadMs?: number;
}

/** What the rotator must know of one IdP's rotation semantics (TB_IDP_PROFILE and overrides). */
export interface IdpRotationSemantics {
  /** Inside this long after a presentation, presenting the same token again is safe; 0: never. */
  reuseGraceMs: number;
  refreshIntrospection: RefreshIntrospection;
}

const DEFAULT_SEMANTICS: IdpRotationSemantics = { reuseGraceMs: 0, refreshIntrospection: 'probe' };

/** Why a token is presented again after a lost answer (issue 12's order). */
type Representation = 'introspected' | 'grace' | 'once';

/** What the rotator needs of the store. */
export type RotatorStore = Pick<
  SessionStore,
  'get' | 'commit' | 'markInflight' | 'schedule' | 'unschedule'
>;

export interface RotatorDeps {
  store: RotatorStore;
  locks: LockService;
  keys: KeySpace;
  idps: ReadonlyMap<string, IdpAdapter>;
  policy: RotationPolicy;
  /** OpenTelemetry instruments (default: on the global meter). */
  metrics?: BrokerMetrics;
  log: Logger;
  clock?: () => number;
  /** Password files of system users (TB_SECRETS_DIR); absent when none is configured. */
  secrets?: LoginSecrets | undefined;
  /** Per IdP name; an IdP not listed has no grace and probes its introspection. */
  semantics?: ReadonlyMap<string, IdpRotationSemantics>;
}

/**
 * The rotation, step by step (ARCHITECTURE.md): lock, re-read, mark the presentation in flight,
 * call the IdP within the lock's validity, compare-and-set the new generation (which publishes),
 * release. Within this process, concurrent demands for one session share one rotation.
 */
export class Rotator {
  private readonly pending = new Map<string, Promise<RotationResult>>();
  private readonly clock: () => number;
  private readonly metrics: BrokerMetrics;
  /** Whether each IdP's introspection may be trusted about refresh tokens (probed per process). */
  readonly introspection: IntrospectionProbes;

  constructor(
    private readonly options: RotatorOptions,
    private readonly deps: RotatorDeps,
  ) {
    this.clock = deps.clock ?? Date.now;
    this.metrics = deps.metrics ?? new BrokerMetrics();
    this.introspection = new IntrospectionProbes(
      (idp) => this.semanticsOf(idp).refreshIntrospection,
      this.metrics,
      deps.log,
      this.clock,
    );
  }

  private semanticsOf(idp: string): IdpRotationSemantics {
    return this.deps.semantics?.get(idp) ?? DEFAULT_SEMANTICS;
  }

  /** Rotations running in this process (for graceful shutdown). */
  get inFlight(): number {
    return this.pending.size;
  }

  /** When a pair issued at `issuedAt` is due (the rotation policy's answer, for enrollments). */
  nextRefreshAt(
    issuedAt: number,
    accessExpiresAt: number,
    family?: Parameters<typeof dueWithLoginAhead>[1],
  ): number {
    const due = this.deps.policy.nextRefreshAt(issuedAt, accessExpiresAt);
    return family ? dueWithLoginAhead(due, family, this.loginAheadMs) : due;
  }

  /** How long before a login session's family ends it logs in again (TB_LOGIN_AHEAD_MS). */
  private get loginAheadMs(): number {
    return this.options.loginAheadMs ?? 300_000;
  }

  /**
   * Counts an enrollment's first presentation (SessionService.enroll makes it itself, under the
   * session's lock) like a rotation's: the IdP call by outcome, and a success as `rotated`.
   */
  countEnrollment(kind: 'refresh' | 'login', outcome: string, ms: number): void {
    this.metrics.idpCall(kind, outcome, ms);
    if (outcome === 'ok') this.metrics.rotation('rotated');
  }

  /** An enrollment whose issued pair could not be stored (counted as a rotation's would be). */
  countPersistFailure(): void {
    this.metrics.persistFailure();
  }

  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending.values()]);
  }

  rotate(ref: SessionRef, demand: RotationDemand): Promise<RotationResult> {
    const id = KeySpace.sessionId(ref);
    let running = this.pending.get(id);
    if (!running) {
      running = this.rotateLocked(ref, demand).finally(() => this.pending.delete(id));
      this.pending.set(id, running);
    }
    return running;
  }

  /**
   * One `broker.rotate` span per rotation: the lock, the IdP call and the store writes nest under
   * it (ioredis spans need a parent), and its traceparent goes into the record it writes, so each
   * Watch event carries it to the sidecars.
   */
  private rotateLocked(ref: SessionRef, demand: RotationDemand): Promise<RotationResult> {
    const requestedAt = this.clock();
    const attributes = {
      [ATTR.tenant]: ref.tenant,
      [ATTR.userHash]: userHash(ref.user),
      [ATTR.replica]: this.options.replica,
      [ATTR.demand]: demand.kind,
    };
    return inSpan('broker.rotate', attributes, async (span) => {
      let result: RotationResult;
      try {
        result = await this.deps.locks.withLock(this.deps.keys.lock(ref), async (lock) => {
          const waited = this.clock() - requestedAt;
          this.metrics.lockWait(waited);
          span.setAttribute(ATTR.lockWaitMs, waited);
          const stored = await this.deps.store.get(ref);
          if (!stored) return { outcome: 'not-found', record: undefined };
          span.setAttribute(ATTR.generationFrom, stored.record.generation);
          return this.rotateHeld(ref, demand, stored, lock);
        });
      } catch (err) {
        const outcome = err instanceof LockUnavailableError ? 'lock-unavailable' : 'error';
        span.setAttribute(ATTR.outcome, outcome);
        this.metrics.rotation(outcome);
        throw err;
      }
      span.setAttribute(ATTR.outcome, result.outcome);
      if (result.record) span.setAttribute(ATTR.generationTo, result.record.generation);
      if (result.outcome === 'persist-failed') markFailed(span, undefined, result.errorCode);
      else if (result.errorCode) span.setAttribute(ATTR.errorCode, result.errorCode);
      this.metrics.rotation(result.outcome);
      return result;
    });
  }

  /**
   * Steps 3 to 5 of the rotation, under the lock: the gate (may this attempt present?), claiming
   * the presentation, the orphan check, presenting once, committing the outcome.
   */
  private async rotateHeld(
    ref: SessionRef,
    demand: RotationDemand,
    stored: StoredSession,
    lock: HeldLock,
  ): Promise<RotationResult> {
    const { store, log } = this.deps;
    const record = stored.record;
    const now = this.clock();
    const gate = presentationGate(stored, demand, lock.validUntil(), now, this.options);
    switch (gate.kind) {
      case 'inactive':
        await store.unschedule(ref);
        return { outcome: 'inactive', record };
      case 'stale':
        return { outcome: 'not-needed', record };
      case 'idle':
        return this.goIdle(record, now);
      case 'not-due':
        await store.schedule(ref, gate.dueAt);
        return { outcome: 'not-needed', record };
      case 'lock-too-short':
        await store.schedule(ref, gate.retryAt);
        return { outcome: 'busy', record };
    }
    const claim = await this.claimPresentation(ref, record, gate.deadline, lock, now);
    if (claim.kind === 'stale') return { outcome: 'not-needed', record };
    if (claim.kind === 'busy') return { outcome: 'busy', record };

    const idp = this.deps.idps.get(record.idp);
    if (!idp) {
      log.error({ tenant: ref.tenant, idp: record.idp }, 'session names an unknown IdP');
      return this.failTransient(record, now, 'IDP_UNKNOWN', undefined, false);
    }
    const call: IdpCall = {
      idp,
      // Not the deadline: a sent request is never abandoned while the lock is held (the adapter
      // bounds connecting and sending, and the wait for the answer).
      signal: lock.signal,
      context: { tenant: record.tenant, user: record.user },
      deadline: gate.deadline,
    };
    // No refresh token: a login session that has not logged in yet, or whose family ended.
    // Or its family ends soon: it logs in again ahead of the end (the refresh token is unused).
    const ahead = loginAheadAt(record, this.loginAheadMs);
    const loggingIn = record.refreshToken === '' || (ahead !== undefined && now >= ahead);
    if ((claim.tookOver || record.outcomeUnknown) && !loggingIn) {
      // The earlier attempt claimed at about its deadline minus the send timeout.
      const earlier =
        stored.inflight?.generation === record.generation ? stored.inflight : undefined;
      const sentAt = earlier ? earlier.deadline - this.options.idpTimeoutMs : undefined;
      const resolved = await this.resolveUnknown(ref, stored, lock, call, sentAt);
      if ('outcome' in resolved) return resolved;
      return this.presentOnce(ref, stored, lock, call, false, resolved.represent);
    }
    return this.presentOnce(ref, stored, lock, call, loggingIn);
  }

  /**
   * Marks the presentation in flight (compare-and-set on the generation, with the call's
   * deadline), so no replica presents the same token while this call could still be running.
   */
  private async claimPresentation(
    ref: SessionRef,
    record: SessionRecord,
    deadline: number,
    lock: HeldLock,
    now: number,
  ): Promise<MarkResult> {
    const { store, log } = this.deps;
    // Marked, the session is back in the due queue for when another replica could take the lock
    // (same step): if this replica dies mid-call, it is rotated then, not at its next due time.
    const mark = await store.markInflight(
      ref,
      {
        generation: record.generation,
        deadline,
        replica: this.options.replica,
        attemptId: randomUUID(),
      },
      now,
      lock.validUntil() + this.options.busyRetryMs,
    );
    if (mark.kind === 'busy') await store.schedule(ref, mark.until + this.options.busyRetryMs);
    if (mark.kind !== 'marked') return mark;
    if (mark.tookOver) {
      this.metrics.takeover();
      log.warn(
        { tenant: ref.tenant, generation: record.generation },
        'taking over a rotation whose earlier attempt ended without an outcome (replica died?)',
      );
    }
    return mark;
  }

  /**
   * The last presentation of this token has no known outcome: the IdP may have consumed it, and
   * presenting it again would then be a reuse that revokes the family. In this order: ask
   * introspection when it is known to work for refresh tokens (an unprobed one is believed only
   * when it says active); inside the IdP's reuse grace period present again (safe); otherwise
   * present again once, and say so. Returns the result when the question settles the attempt.
   * `sentAt` is when the lost presentation was sent, when known (the grace period counts from it).
   */
  private async resolveUnknown(
    ref: SessionRef,
    stored: StoredSession,
    lock: HeldLock,
    call: IdpCall,
    sentAt: number | undefined,
  ): Promise<RotationResult | { represent: Representation }> {
    const { store, log } = this.deps;
    const record = stored.record;
    const { idp } = call;
    const state = this.introspection.state(idp);
    if (state === 'usable' || state === 'unprobed') {
      let active: boolean | undefined;
      try {
        active = await inSpan('idp.introspect', { [ATTR.idp]: idp.name }, () =>
          idp.isActive!(record.refreshToken, call.signal, call.context),
        );
      } catch (err) {
        this.metrics.introspection('failed');
        if (state === 'usable') {
          // Keep the marker, so the next attempt asks again instead of presenting blindly.
          this.metrics.outcomeUnknown('deferred');
          const at = this.deps.policy.retryAt(
            this.clock(),
            record.failedAttempts + 1,
            undefined,
            0,
          );
          await store.schedule(ref, Math.max(at, call.deadline + this.options.busyRetryMs));
          log.warn(
            { tenant: ref.tenant, err: errorText(err) },
            'could not ask the IdP whether a refresh token whose answer was lost is still unused; will ask again',
          );
          return { outcome: 'retry-scheduled', record, errorCode: 'IDP_UNAVAILABLE' };
        }
        active = undefined;
      }
      if (active === true) {
        this.metrics.introspection('active');
        this.metrics.outcomeUnknown('introspected-active');
        return { represent: 'introspected' };
      }
      if (active === false && state === 'usable') {
        this.metrics.introspection('consumed');
        this.metrics.outcomeUnknown('introspected-consumed');
        const lost = new IdpTokenConsumedError(
          'the refresh token was consumed by a presentation whose answer was lost (introspection says inactive)',
        );
        if (this.mayLogInAgain(record, lost)) return this.logInAgain(ref, stored, lock, lost);
        return this.onIdpFailure(record, lost);
      }
      // Not probed yet: an inactive answer may only mean that introspection ignores refresh tokens.
      // While the access token lasts, wait for this replica's next rotation to probe it: then
      // the answer can be believed (or introspection is known unusable), instead of presenting a
      // token the IdP may indeed have consumed.
      this.metrics.introspection('unknown');
      const now = this.clock();
      const decideBy = record.accessExpiresAt - 2 * this.options.idpTimeoutMs;
      if (active === false && now < decideBy) {
        this.metrics.outcomeUnknown('deferred');
        log.info(
          { tenant: ref.tenant, generation: record.generation },
          'answer lost; introspection, not yet probed, says inactive: deciding after the probe',
        );
        return this.failTransient(
          record,
          now,
          'IDP_UNAVAILABLE',
          Math.min(1_000, decideBy - now),
          true,
        );
      }
    }
    const graceMs = this.semanticsOf(idp.name).reuseGraceMs;
    if (graceMs > 0 && sentAt !== undefined) {
      // The second request must reach the IdP inside the grace: keep the send timeout in hand.
      const left = sentAt + graceMs - this.clock() - this.options.idpTimeoutMs;
      if (left > 0) {
        this.metrics.outcomeUnknown('grace-represented');
        log.info(
          { tenant: ref.tenant, generation: record.generation, graceMs },
          'answer lost: presenting the refresh token again inside the IdP reuse grace period',
        );
        return { represent: 'grace' };
      }
    }
    this.metrics.outcomeUnknown('represented-once');
    log.warn(
      { tenant: ref.tenant, generation: record.generation, code: 'OUTCOME_UNKNOWN_REPRESENTED' },
      'answer lost and nothing can tell whether the IdP consumed the refresh token: presenting it again once (a reuse if it was consumed)',
    );
    return { represent: 'once' };
  }

  /**
   * Presents the refresh token (or logs in) exactly once, then commits what the IdP said. When
   * the answer is lost (sent, no HTTP answer) and the lock is still held, the outcome is resolved
   * at once (resolveUnknown); a presentation that is itself such a second one (`represented`) is
   * not repeated: its loss is recorded and the next attempt resolves it.
   */
  private async presentOnce(
    ref: SessionRef,
    stored: StoredSession,
    lock: HeldLock,
    call: IdpCall,
    loggingIn: boolean,
    represented?: Representation,
  ): Promise<RotationResult> {
    const record = stored.record;
    const { idp, signal, context } = call;
    const kind = loggingIn ? 'login' : 'refresh';
    const rotation = trace.getActiveSpan();
    const callStart = this.clock();
    const called = (outcome: string) => {
      const ms = this.clock() - callStart;
      this.metrics.idpCall(kind, outcome, ms);
      rotation?.setAttributes({ [ATTR.idpLatencyMs]: ms, [ATTR.idp]: idp.name });
    };
    let tokens: TokenSet;
    try {
      tokens = await inSpan(`idp.${kind}`, { [ATTR.idp]: idp.name }, () =>
        loggingIn
          ? this.logIn(idp, record, signal, context)
          : idp.refresh(record.refreshToken, signal, context),
      );
    } catch (err) {
      called(errorCode(err));
      // A login ahead of the family's end failed: the family still works, so keep refreshing it.
      if (loggingIn && record.refreshToken !== '') return this.loginAheadFailed(record, err);
      if (!loggingIn && this.mayLogInAgain(record, err))
        return this.logInAgain(ref, stored, lock, err as IdpInvalidGrantError);
      const unknown = err instanceof IdpTransientError && err.outcomeUnknown && !loggingIn;
      if (unknown && represented === undefined && !lock.signal.aborted) {
        const resolved = await this.resolveUnknown(ref, stored, lock, call, callStart);
        if ('outcome' in resolved) return resolved;
        return this.presentOnce(ref, stored, lock, call, false, resolved.represent);
      }
      if (represented === 'once' && err instanceof IdpInvalidGrantError) {
        this.deps.log.warn(
          {
            tenant: ref.tenant,
            generation: record.generation,
            code: 'OUTCOME_UNKNOWN_REPRESENTED',
          },
          'the IdP refused the second presentation (invalid_grant): the lost answer had consumed the token',
        );
        return this.onIdpFailure(record, err, 'OUTCOME_UNKNOWN_REPRESENTED');
      }
      return this.onIdpFailure(record, err);
    }
    called('ok');
    if (loggingIn)
      this.deps.log.info(
        { tenant: ref.tenant, generation: record.generation + 1 },
        record.refreshToken === ''
          ? 'logged in: a new token family'
          : 'logged in ahead of the token family end (TB_LOGIN_AHEAD_MS): a new token family',
      );
    const at = {
      issuedAt: callStart,
      nextRefreshAt: this.deps.policy.nextRefreshAt(callStart, tokens.accessExpiresAt),
      traceparent: currentTraceparent(),
      loggedIn: loggingIn,
    };
    let transition = rotated(record, tokens, at);
    const due = dueWithLoginAhead(at.nextRefreshAt, transition.next, this.loginAheadMs);
    if (due !== at.nextRefreshAt)
      transition = rotated(record, tokens, { ...at, nextRefreshAt: due });
    // A blind second presentation that worked stays visible on the session until the next one.
    if (represented === 'once') transition.next.lastErrorCode = 'OUTCOME_UNKNOWN_REPRESENTED';
    const result = await this.persist(transition, record.generation, lock);
    // A refresh token just received and stored under the lock is surely live: the one moment to
    // learn whether this IdP's introspection knows refresh tokens.
    if (result.outcome === 'rotated' && tokens.refreshToken !== undefined)
      await this.introspection.probe(
        idp,
        tokens.refreshToken,
        lock.signal,
        this.options.idpTimeoutMs,
        context,
      );
    return result;
  }

  private async logIn(
    idp: IdpAdapter,
    record: SessionRecord,
    signal: AbortSignal,
    context: IdpContext,
  ): Promise<TokenSet> {
    const login = record.login;
    if (!login)
      throw new IdpInvalidGrantError('the session holds neither a refresh token nor a login');
    if (!idp.login)
      throw new IdpLoginRejectedError(`IdP ${JSON.stringify(idp.name)} offers no login`);
    let password = login.password;
    if (password === undefined) {
      if (!this.deps.secrets || login.passwordFile === undefined)
        throw new LoginSecretError('the login names a password file but TB_SECRETS_DIR is not set');
      password = await this.deps.secrets.read(login.passwordFile);
    }
    return idp.login({ username: login.username, password }, signal, context);
  }

  private mayLogInAgain(record: SessionRecord, err: unknown): boolean {
    return (
      (err instanceof IdpInvalidGrantError || err instanceof IdpTokenConsumedError) &&
      record.login !== undefined &&
      (record.reloginStreak ?? 0) < (this.options.maxRelogins ?? 3)
    );
  }

  /**
   * The family ended (invalid_grant) but the session has a login: forget the dead refresh token
   * first (so no one presents it again, even if this replica dies), then log in under the same
   * lock. A login that is refused ends in REAUTH_REQUIRED, and `reloginStreak` bounds the loop.
   */
  private async logInAgain(
    ref: SessionRef,
    stored: StoredSession,
    lock: HeldLock,
    err: IdpInvalidGrantError | IdpTokenConsumedError,
  ): Promise<RotationResult> {
    const record = stored.record;
    const now = this.clock();
    const forgotten = familyForgotten(record, err.code, now);
    this.deps.log.warn(
      { tenant: ref.tenant, generation: record.generation, relogins: forgotten.next.reloginStreak },
      err instanceof IdpTokenConsumedError
        ? 'token family lost with an answer (introspection says consumed): logging in again with the enrolled login'
        : 'token family ended (invalid_grant): logging in again with the enrolled login',
    );
    // Same generation: nothing to publish; the commit also clears the in-flight marker.
    if (!(await this.deps.store.commit(forgotten, record.generation, now)))
      return { outcome: 'not-needed', record: undefined };
    return this.rotateHeld(
      ref,
      { kind: 'generation', generation: record.generation },
      { ...stored, record: forgotten.next, inflight: undefined },
      lock,
    );
  }

  /**
   * Compare-and-set of the new pair. While the store is unreachable it retries, holding the lock,
   * until `persistRetryMs` passes or the lock is lost: the old refresh token is consumed, so the
   * new pair is the session's only future.
   */
  private persist(
    transition: Transition,
    expected: number,
    lock: HeldLock,
  ): Promise<RotationResult> {
    return inSpan('broker.persist', { [ATTR.generation]: transition.next.generation }, (span) =>
      this.persistHeld(transition, expected, lock, span),
    );
  }

  private async persistHeld(
    transition: Transition,
    expected: number,
    lock: HeldLock,
    span: Span,
  ): Promise<RotationResult> {
    const { store, log } = this.deps;
    const next = transition.next;
    const giveUpAt = this.clock() + (this.options.persistRetryMs ?? 30_000);
    for (let attempt = 1; ; attempt++) {
      try {
        if (await store.commit(transition, expected, this.clock()))
          return { outcome: 'rotated', record: next };
        // Under a held lock the generation cannot move: someone presented beside us.
        this.metrics.reuseSuspicion();
        markFailed(span, undefined, 'PERSIST_CONFLICT');
        log.error(
          { tenant: next.tenant, generation: expected },
          'generation moved during a locked rotation: possible double presentation',
        );
        return { outcome: 'persist-failed', record: undefined, errorCode: 'PERSIST_CONFLICT' };
      } catch (err) {
        const wait = Math.min(2_000, 100 * 2 ** (attempt - 1));
        if (lock.signal.aborted || this.clock() + wait > giveUpAt) {
          this.metrics.persistFailure();
          markFailed(span, err);
          log.error(
            { tenant: next.tenant, generation: next.generation, err: errorText(err) },
            'IdP answered but the new token pair could not be stored; the session needs re-enrollment if it is lost',
          );
          return { outcome: 'persist-failed', record: undefined, errorCode: 'PERSIST_FAILED' };
        }
        log.warn(
          { tenant: next.tenant, attempt, err: errorText(err) },
          'storing the new token pair failed; retrying while the lock is held',
        );
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  private async onIdpFailure(
    record: SessionRecord,
    err: unknown,
    codeOverride?: string,
  ): Promise<RotationResult> {
    const { store, log } = this.deps;
    const now = this.clock();
    if (
      err instanceof IdpInvalidGrantError ||
      err instanceof IdpLoginRejectedError ||
      err instanceof IdpTokenConsumedError
    ) {
      const code = codeOverride ?? err.code;
      log.warn(
        { tenant: record.tenant, generation: record.generation, code },
        err instanceof IdpLoginRejectedError
          ? 'login refused by the IdP: session needs re-enrollment'
          : err instanceof IdpTokenConsumedError
            ? 'refresh token consumed by a presentation whose answer was lost: session needs re-authentication'
            : 'refresh token rejected (invalid_grant): session needs re-authentication',
      );
      const transition = reauthRequired(record, code, currentTraceparent());
      const written = await store.commit(transition, record.generation, now);
      return {
        outcome: 'reauth-required',
        record: written ? transition.next : undefined,
        errorCode: code,
      };
    }
    if (err instanceof IdpInvalidClientError) {
      log.error(
        { idp: record.idp, detail: err.detail },
        'IdP rejected the broker client credentials (invalid_client): fix the IdP configuration',
      );
    } else if (err instanceof LoginSecretError) {
      log.error(
        { tenant: record.tenant, err: err.message },
        'cannot log in: the password file is unreadable (TB_SECRETS_DIR)',
      );
    } else {
      log.warn(
        {
          tenant: record.tenant,
          code: errorCode(err),
          err: errorText(err),
        },
        'refresh failed, will retry',
      );
    }
    const retryAfter = err instanceof IdpTransientError ? err.retryAfterMs : undefined;
    // Sent, but no answer: the token may be consumed. The next attempt resolves it before
    // presenting (resolveUnknown). An HTTP answer (503, 429) is a known outcome: not consumed.
    const unknown =
      err instanceof IdpTransientError && err.outcomeUnknown && record.refreshToken !== '';
    return this.failTransient(record, now, errorCode(err), retryAfter, unknown);
  }

  /**
   * Logging in ahead of the family's end failed: not a reason to end a family that still works.
   * Counted as the last login (so it is not tried again within TB_LOGIN_AHEAD_MS), and the
   * session is due again at once, to refresh as usual.
   */
  private async loginAheadFailed(record: SessionRecord, err: unknown): Promise<RotationResult> {
    const now = this.clock();
    this.deps.log.warn(
      { tenant: record.tenant, code: errorCode(err), err: errorText(err) },
      'logging in ahead of the token family end failed; refreshing the current family instead',
    );
    return this.failTransient(
      { ...record, loggedInAt: now },
      now,
      errorCode(err),
      this.options.busyRetryMs,
      false,
    );
  }

  private async failTransient(
    record: SessionRecord,
    now: number,
    code: string,
    retryAfterMs: number | undefined,
    outcomeUnknown: boolean,
  ): Promise<RotationResult> {
    const retryAt = this.deps.policy.retryAt(
      now,
      record.failedAttempts + 1,
      retryAfterMs,
      record.accessExpiresAt,
    );
    // Same generation: nothing new to publish, but the attempt is recorded and its marker cleared.
    const transition = retryScheduled(record, { code, retryAt, outcomeUnknown });
    const written = await this.deps.store.commit(transition, record.generation, now);
    return {
      outcome: 'retry-scheduled',
      record: written ? transition.next : record,
      errorCode: code,
      retryAfterMs: retryAt - now,
    };
  }

  private async goIdle(record: SessionRecord, now: number): Promise<RotationResult> {
    const transition = idle(record, currentTraceparent());
    const written = await this.deps.store.commit(transition, record.generation, now);
    this.deps.log.info(
      { tenant: record.tenant },
      'session idle: no reader or watcher; not refreshed',
    );
    return { outcome: 'went-idle', record: written ? transition.next : record };
  }
}

/** One presentation's IdP, abort signal (lock lost or deadline), session context and deadline. */
interface IdpCall {
  idp: IdpAdapter;
  signal: AbortSignal;
  context: IdpContext;
  deadline: number;
}
