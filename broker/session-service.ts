import type { Logger } from 'pino';
import { idProblem, MAX_ID_LENGTH } from '../shared/session-ref.js';
import { ATTR } from '../shared/telemetry/span-attributes.js';
import { inSpan } from '../shared/telemetry/spans.js';
import { currentTraceparent } from '../shared/telemetry/trace-context.js';
import {
  BrokerClientRejectedError,
  BrokerError,
  errorCode,
  IdpInvalidClientError,
  IdpInvalidGrantError,
  IdpLoginRejectedError,
  IdpTransientError,
  InvalidArgumentError,
  LockUnavailableError,
  ReauthRequiredError,
  SessionInactiveError,
  SessionNotFoundError,
  ShuttingDownError,
  UnavailableError,
} from './errors.js';
import { errorText } from './redaction.js';
import { type IdpAdapter, type TokenSet } from './idp/idp-adapter.js';
import type { LoginSecrets } from './idp/login-secrets.js';
import { type LockService } from './lock/lock-service.js';
import type { Rotator, RotationResult } from './rotation/rotator.js';
import { KeySpace } from './store/keys.js';
import {
  metadataOf,
  type SessionMetadata,
  type SessionRecord,
  type SessionRef,
  type StoredLogin,
  type StoredSession,
} from './store/session-record.js';
import type { SessionStore } from './store/session-store.js';
import { enrolled, reactivated, revoked, type FamilySeed } from './session-transitions.js';
import type { WatchHub } from './watch-hub.js';
import type { SessionCache } from './session-cache.js';

/** How long Enroll keeps trying to store an issued pair while the store does not answer. */
const STORE_RETRY_MS = 30_000;
export interface SessionServiceOptions {
  defaultIdp: string;
  /** A forced Refresh is honoured only for an access token at least this old. */
  refreshMinIntervalMs: number;
  /** How long Refresh waits for another replica's rotation when the lock is busy. */
  refreshWaitMs: number;
  /** Reads and watches record a use at most this often per session (lease keeping). */
  touchIntervalMs: number;
  /** The longest IdP call (a token exchange at enrollment). */
  idpTimeoutMs?: number;
}

/** What a caller hands over at Enroll (the proto's `credential` oneof). */
export type EnrollCredential =
  /** A refresh token dedicated to the broker: rotated at once, the caller's copy dies. */
  | { kind: 'refresh_token'; refreshToken: string }
  /** A system user: the broker logs in now, and again whenever the family ends. */
  | { kind: 'login'; username: string; password?: string; passwordFile?: string }
  /** RFC 8693: the user's token is exchanged for a family only the broker holds. */
  | { kind: 'token_exchange'; subjectToken: string; subjectTokenType?: string };

export interface EnrollInput extends Partial<SessionRef> {
  idp?: string;
  credential?: EnrollCredential | undefined;
  /** Shorthand for `credential: { kind: 'refresh_token', refreshToken }`. */
  refreshToken?: string | undefined;
  /** The authenticated caller (namespace/serviceaccount), recorded with the family. */
  enrolledBy?: string | undefined;
}

/** Revoke's answer: the session, and whether the IdP revoked its refresh token (and why not). */
export interface RevokeResult {
  session: SessionMetadata;
  idpRevoked: boolean;
  /** Empty when the IdP revoked it. */
  idpRevokeProblem: string;
}

/** What the session service needs of the store. */
export type SessionServiceStore = Pick<SessionStore, 'get' | 'commit' | 'touch' | 'list'>;

export interface SessionServiceDeps {
  store: SessionServiceStore;
  locks: LockService;
  keys: KeySpace;
  idps: ReadonlyMap<string, IdpAdapter>;
  rotator: Rotator;
  hub: WatchHub;
  log: Logger;
  clock?: () => number;
  /** Password files of system users (TB_SECRETS_DIR); absent when none is configured. */
  secrets?: LoginSecrets | undefined;
  /** GetToken's copy of opened records, kept current by the store's events; absent: none. */
  cache?: SessionCache | undefined;
  /** Counts each GetToken: answered from the cache, or read from the store. */
  countRead?: ((result: 'hit' | 'miss') => void) | undefined;
}

/** Checks a request's tenant and user ids (shared/session-ref.ts has the rules). */
export function validateRef(ref: { tenant?: string; user?: string }): SessionRef {
  for (const field of ['tenant', 'user'] as const) {
    const value = ref[field] ?? '';
    const problem = idProblem(value, 'is required');
    // The length, never the value: a hostile id may be megabytes long.
    if (problem)
      throw new InvalidArgumentError(
        field,
        value.length > MAX_ID_LENGTH ? `${problem} (got ${value.length})` : problem,
      );
  }
  return { tenant: ref.tenant!, user: ref.user! };
}

/** The broker's use cases, independent of gRPC. */
export class SessionService {
  private readonly clock: () => number;
  private readonly lastTouch = new Map<string, number>();
  private closing = false;

  constructor(
    private readonly options: SessionServiceOptions,
    private readonly deps: SessionServiceDeps,
  ) {
    this.clock = deps.clock ?? Date.now;
  }

  /** How often a use is recorded; a Watch stream renews its sessions' lease this often. */
  get touchIntervalMs(): number {
    return this.options.touchIntervalMs;
  }

  /** Stop taking new work (graceful shutdown). */
  close(): void {
    this.closing = true;
  }

  /**
   * Takes ownership of a credential for `(tenant, user)`: a dedicated refresh token (rotated at
   * once, so the caller's copy is dead), a system user's login (the broker logs in at once), or a
   * token exchange (a new family issued to the broker). All or nothing: the first rotation, login
   * or exchange happens inside the call and only its result is committed, with the session, in
   * one step. On any failure the caller gets the IdP's real answer and no session is created or
   * changed (a failed re-enrollment leaves the old family serving). Re-enrolling an existing
   * session replaces its family and keeps its generation rising.
   */
  async enroll(input: EnrollInput): Promise<SessionMetadata> {
    this.checkOpen();
    const ref = validateRef(input);
    const idpName = input.idp || this.options.defaultIdp;
    const idp = this.deps.idps.get(idpName);
    if (!idp)
      throw new InvalidArgumentError(
        'idp',
        `names no configured identity provider (known: ${[...this.deps.idps.keys()].join(', ')})`,
      );
    const credential =
      input.credential ??
      (input.refreshToken
        ? { kind: 'refresh_token', refreshToken: input.refreshToken }
        : undefined);
    if (!credential)
      throw new InvalidArgumentError(
        'credential',
        'is required: refresh_token, login or token_exchange',
      );
    const first = await this.firstGrant(ref, idp, credential);
    // Under the session's lock, so no rotation of an earlier family runs beside it. The caller's
    // credential is presented exactly once: never retried here (the caller decides), and since
    // the broker stores nothing of it before the IdP answered, no other replica can present it.
    const result = await this.deps.locks.withLock(this.deps.keys.lock(ref), async (lock) => {
      const issuedAt = this.clock();
      // The adapter bounds sending (TB_IDP_TIMEOUT_MS) and, once sent, waiting for the answer
      // (TB_IDP_ANSWER_WAIT_MS): a sent credential's answer is awaited while the lock holds, as
      // for a rotation, since it carries the only copy of the new refresh token.
      const signal = lock.signal;
      const count = (outcome: string) => {
        if (first.counted)
          this.deps.rotator.countEnrollment(first.counted, outcome, this.clock() - issuedAt);
      };
      let tokens: TokenSet;
      try {
        tokens = await inSpan(`idp.${first.counted ?? 'exchange'}`, { [ATTR.idp]: idpName }, () =>
          first.present(signal),
        );
      } catch (err) {
        count(errorCode(err));
        this.logEnrollFailure(ref, idpName, first.what, err);
        throw enrollmentFailure(err, first, idpName);
      }
      count('ok');
      const seed: FamilySeed = {
        refreshToken: tokens.refreshToken ?? first.keptRefreshToken,
        login: first.login,
        enrolledBy: input.enrolledBy,
      };
      const committed = await this.commitFamily(ref, idpName, seed, issuedAt, tokens, lock.signal);
      // The refresh token just received and stored under the lock is surely live: as at a
      // rotation, the moment to learn whether this IdP's introspection knows refresh tokens.
      if (tokens.refreshToken !== undefined)
        await this.deps.rotator.introspection.probe(
          idp,
          tokens.refreshToken,
          lock.signal,
          this.options.idpTimeoutMs ?? 5_000,
          ref,
        );
      return committed;
    });
    const { created, ...meta } = result;
    // A session this commit created records its first use with it; an existing one's is a use.
    if (!created) await this.deps.store.touch(ref, this.clock());
    this.touched(KeySpace.sessionId(ref), this.clock());
    this.deps.log.info(
      { tenant: ref.tenant, idp: idpName, generation: meta.generation, by: first.what },
      'enrolled',
    );
    return meta;
  }

  /** Checks the credential and says how to present it (once) to the IdP. */
  private async firstGrant(
    ref: SessionRef,
    idp: IdpAdapter,
    credential: EnrollCredential,
  ): Promise<FirstGrant> {
    switch (credential.kind) {
      case 'refresh_token': {
        const refreshToken = credential.refreshToken;
        if (!refreshToken) throw new InvalidArgumentError('refresh_token', 'is required');
        checkTokenLength(refreshToken, 'refresh_token');
        return {
          what: 'refresh token',
          field: 'refresh_token',
          counted: 'refresh',
          login: undefined,
          present: (signal) => idp.refresh(refreshToken, signal, ref),
          // An IdP that does not rotate keeps the token the caller handed over.
          keptRefreshToken: refreshToken,
        };
      }
      case 'login': {
        const login = await this.checkLogin(idp, credential);
        return {
          what: 'login',
          field: 'login',
          counted: 'login',
          login,
          present: async (signal) =>
            idp.login!(
              { username: login.username, password: await this.passwordOf(login) },
              signal,
              ref,
            ),
          keptRefreshToken: '',
        };
      }
      case 'token_exchange': {
        if (!idp.exchange)
          throw new InvalidArgumentError(
            'token_exchange',
            `is not supported by identity provider ${JSON.stringify(idp.name)}`,
          );
        const { subjectToken, subjectTokenType } = credential;
        if (!subjectToken)
          throw new InvalidArgumentError('token_exchange.subject_token', 'is required');
        checkTokenLength(subjectToken, 'token_exchange.subject_token');
        // The user's own family is left alone: only the new one is stored, under the lock.
        return {
          what: 'token exchange',
          field: 'token_exchange.subject_token',
          counted: undefined,
          login: undefined,
          present: (signal) =>
            idp.exchange!({ token: subjectToken, tokenType: subjectTokenType ?? '' }, signal, ref),
          keptRefreshToken: '',
        };
      }
    }
  }

  private async checkLogin(
    idp: IdpAdapter,
    login: Extract<EnrollCredential, { kind: 'login' }>,
  ): Promise<StoredLogin> {
    if (!idp.login)
      throw new InvalidArgumentError(
        'login',
        `is not supported by identity provider ${JSON.stringify(idp.name)}`,
      );
    if (!login.username) throw new InvalidArgumentError('login.username', 'is required');
    if (login.password) return { username: login.username, password: login.password };
    if (!login.passwordFile)
      throw new InvalidArgumentError('login.password', 'or login.password_file is required');
    if (!this.deps.secrets)
      throw new InvalidArgumentError(
        'login.password_file',
        'needs TB_SECRETS_DIR to be set on the broker',
      );
    await this.deps.secrets.check(login.passwordFile, 'login.password_file');
    return { username: login.username, passwordFile: login.passwordFile };
  }

  private async passwordOf(login: StoredLogin): Promise<string> {
    if (login.password !== undefined) return login.password;
    // checkLogin made sure a password file comes with TB_SECRETS_DIR.
    return this.deps.secrets!.read(login.passwordFile!);
  }

  private logEnrollFailure(ref: SessionRef, idp: string, what: string, err: unknown): void {
    const fields = {
      tenant: ref.tenant,
      idp,
      code: errorCode(err),
      err: errorText(err),
      detail: (err as { detail?: unknown }).detail,
    };
    if (err instanceof IdpInvalidClientError)
      this.deps.log.error(
        fields,
        `enrollment (${what}) refused: the IdP rejected the broker's own client configuration; no session was created or changed`,
      );
    else
      this.deps.log.warn(fields, `enrollment (${what}) failed; no session was created or changed`);
  }

  /**
   * Writes the session's new family, already issued (`tokens`), as a new generation published at
   * once; called under the session's lock. Should the compare-and-set miss (the lock lapsed and
   * the earlier family rotated meanwhile), the session is read again and replaced all the same:
   * the enrollment supersedes whatever that family did, and its new pair must not be lost. A
   * store that does not answer (a failover, a write not yet acknowledged by replicas) is tried
   * again with backoff while the lock holds, as a rotation's persist is: the IdP has already
   * consumed the caller's credential.
   */
  private async commitFamily(
    ref: SessionRef,
    idp: string,
    seed: FamilySeed,
    issuedAt: number,
    tokens: TokenSet,
    lock: AbortSignal,
  ): Promise<SessionMetadata & { created: boolean }> {
    const giveUpAt = this.clock() + STORE_RETRY_MS;
    for (let attempt = 1; ; attempt++) {
      let committed: (SessionMetadata & { created: boolean }) | undefined;
      try {
        committed = await this.commitFamilyOnce(ref, idp, seed, issuedAt, tokens);
      } catch (err) {
        if (err instanceof BrokerError && !(err instanceof UnavailableError)) throw err;
        const wait = Math.min(2_000, 100 * 2 ** (attempt - 1));
        if (lock.aborted || this.clock() + wait > giveUpAt) {
          this.deps.rotator.countPersistFailure();
          this.deps.log.error(
            { tenant: ref.tenant, err: errorText(err) },
            'the IdP issued the new token pair of an enrollment but it could not be stored; enroll again with a new credential',
          );
          throw err;
        }
        this.deps.log.warn(
          { tenant: ref.tenant, attempt, err: errorText(err) },
          'storing the enrolled token pair failed; retrying while the lock is held',
        );
        await new Promise((resolve) => setTimeout(resolve, wait));
        continue;
      }
      if (committed) return committed;
      throw new UnavailableError(
        'the session kept changing during enrollment and the new family was not stored; enroll again with a new credential',
      );
    }
  }

  /**
   * One try: up to 3 compare-and-set rounds; undefined when the session kept changing. A session
   * this replica has not seen lately is first written as new, without a read (most enrollments
   * create their session); should it exist, that compare-and-set misses, changes nothing, and the
   * rounds read it as for any existing session.
   */
  private async commitFamilyOnce(
    ref: SessionRef,
    idp: string,
    seed: FamilySeed,
    issuedAt: number,
    tokens: TokenSet,
  ): Promise<(SessionMetadata & { created: boolean }) | undefined> {
    const issued = {
      tokens,
      nextRefreshAt: this.deps.rotator.nextRefreshAt(issuedAt, tokens.accessExpiresAt, {
        login: seed.login,
        refreshToken: seed.refreshToken,
        refreshExpiresAt: tokens.refreshExpiresAt ?? 0,
        loggedInAt: seed.login ? issuedAt : undefined,
      }),
    };
    let guessNew = !this.lastTouch.has(KeySpace.sessionId(ref));
    for (let attempt = 0; attempt < 3;) {
      const stored = guessNew ? undefined : await this.deps.store.get(ref);
      if (!guessNew) attempt++;
      guessNew = false;
      const previous = stored?.record;
      const transition = enrolled(
        ref,
        idp,
        seed,
        previous,
        { now: issuedAt, traceparent: currentTraceparent() },
        issued,
      );
      const now = this.clock();
      if (await this.deps.store.commit(transition, previous ? previous.generation : null, now))
        return {
          ...metadataOf({
            record: transition.next,
            lastUsedAt: stored?.lastUsedAt ?? now,
            inflight: undefined,
          }),
          created: previous === undefined,
        };
    }
    return undefined;
  }

  /**
   * The current access token; reactivates an idle session, rotates one that has none valid. An
   * ACTIVE record with a valid token comes from the cache when it holds one (never staler than
   * the last event; the answer then carries no refresh token), else from the store.
   */
  async getToken(input: Partial<SessionRef>): Promise<SessionRecord> {
    this.checkOpen();
    const ref = validateRef(input);
    const cache = this.deps.cache;
    const cached = cache?.get(ref);
    if (cached && cached.accessExpiresAt > this.clock()) {
      this.deps.countRead?.('hit');
      await this.touch(ref);
      return cached;
    }
    this.deps.countRead?.('miss');
    let stored: StoredSession;
    if (cache) {
      const load = cache.begin(ref);
      let read: StoredSession | undefined;
      try {
        read = await this.deps.store.get(ref);
      } finally {
        cache.end(load, read?.record);
      }
      if (!read) throw new SessionNotFoundError(ref.tenant, ref.user);
      stored = read;
    } else stored = await this.mustGet(ref);
    await this.touch(ref);
    if (stored.record.status === 'IDLE') stored = await this.reactivate(stored);
    const record = this.usable(stored.record);
    if (record.accessToken && record.accessExpiresAt > this.clock()) return record;
    const result = await this.rotateOrWait(ref, record.generation);
    return this.withValidToken(this.usable(result));
  }

  /** An answer with a token must carry a valid one: otherwise say when to ask again. */
  private withValidToken(record: SessionRecord): SessionRecord {
    const now = this.clock();
    if (record.accessToken && record.accessExpiresAt > now) return record;
    const retryAfterMs = Math.max(500, record.nextRefreshAt - now);
    throw new UnavailableError(
      `no valid access token now; a refresh is pending${record.lastErrorCode ? ` (last error ${record.lastErrorCode})` : ''}`,
      retryAfterMs,
    );
  }

  /** Honours "generation N was rejected" once per generation, cluster-wide. */
  async refresh(input: Partial<SessionRef> & { generation?: number }): Promise<SessionRecord> {
    this.checkOpen();
    const ref = validateRef(input);
    const generation = input.generation ?? 0;
    let stored = await this.mustGet(ref);
    await this.touch(ref);
    if (stored.record.status === 'IDLE') stored = await this.reactivate(stored);
    const record = this.usable(stored.record);
    if (record.generation !== generation) return this.withValidToken(record);
    const age = this.clock() - record.issuedAt;
    if (record.accessToken && age < this.options.refreshMinIntervalMs)
      return this.withValidToken(record);
    return this.withValidToken(this.usable(await this.rotateOrWait(ref, generation)));
  }

  /**
   * Stops refreshing at once and revokes the refresh token at the IdP when it can. The broker
   * forgets the token either way; the answer says whether the IdP revoked it, and why not.
   */
  async revoke(input: Partial<SessionRef>): Promise<RevokeResult> {
    this.checkOpen();
    const ref = validateRef(input);
    return this.deps.locks.withLock(this.deps.keys.lock(ref), async () => {
      const stored = await this.mustGet(ref);
      const record = stored.record;
      if (record.status === 'REVOKED')
        return {
          session: metadataOf(stored),
          idpRevoked: false,
          idpRevokeProblem: 'already revoked (the first Revoke reported the IdP outcome)',
        };
      const transition = revoked(record, currentTraceparent());
      if (!(await this.deps.store.commit(transition, record.generation, this.clock())))
        throw new UnavailableError('session changed during revocation; retry');
      const problem = await this.revokeAtIdp(ref, record);
      const log = { tenant: ref.tenant, idp: record.idp, generation: transition.next.generation };
      if (problem === undefined)
        this.deps.log.info({ ...log, idpRevoked: true }, 'session revoked, and at the IdP');
      else
        this.deps.log.warn(
          { ...log, idpRevoked: false, problem },
          'session revoked, but NOT at the IdP: its refresh token may still work there until it expires',
        );
      return {
        session: metadataOf({ ...stored, record: transition.next }),
        idpRevoked: problem === undefined,
        idpRevokeProblem: problem ?? '',
      };
    });
  }

  /** Revokes the record's refresh token at its IdP; undefined when done, else why not. */
  private async revokeAtIdp(ref: SessionRef, record: SessionRecord): Promise<string | undefined> {
    if (!record.refreshToken) return 'no refresh token held (the session had not logged in yet)';
    const idp = this.deps.idps.get(record.idp);
    if (!idp) return `identity provider ${JSON.stringify(record.idp)} is not configured`;
    const signal = AbortSignal.timeout(this.options.idpTimeoutMs ?? 5_000);
    try {
      const outcome = await idp.revoke(record.refreshToken, signal, ref);
      return outcome.revoked ? undefined : outcome.reason;
    } catch (err) {
      this.deps.log.warn(
        { tenant: ref.tenant, err: errorText(err), detail: (err as { detail?: unknown }).detail },
        'IdP revocation failed',
      );
      return `IdP error ${errorCode(err)}${err instanceof BrokerError ? `: ${err.message}` : ''}`;
    }
  }

  async list(
    tenant: string,
    pageSize: number,
    pageToken: string,
  ): Promise<{ sessions: SessionMetadata[]; next: string }> {
    const limit = pageSize === 0 ? 100 : Math.min(pageSize, 1000);
    let after = '';
    if (pageToken) {
      after = Buffer.from(pageToken, 'base64url').toString();
      try {
        KeySpace.parseSessionId(after);
      } catch {
        throw new InvalidArgumentError('page_token', 'is not a token from ListSessions');
      }
    }
    const page = await this.deps.store.list(tenant, after, limit);
    return {
      sessions: page.sessions.map(metadataOf),
      next: page.next ? Buffer.from(page.next).toString('base64url') : '',
    };
  }

  /** A Watch subscribed to the session: a use, and like a read it makes an idle session active. */
  async watchStarted(ref: SessionRef): Promise<void> {
    await this.touch(ref);
    const stored = await this.deps.store.get(ref);
    if (stored?.record.status === 'IDLE') await this.reactivate(stored);
  }

  /** Records a use of the session (at most once per touch interval per session). */
  async touch(ref: SessionRef): Promise<void> {
    const id = KeySpace.sessionId(ref);
    const now = this.clock();
    const last = this.lastTouch.get(id) ?? 0;
    if (now - last < this.options.touchIntervalMs) return;
    this.touched(id, now);
    await this.deps.store.touch(ref, now);
  }

  /** Notes a use recorded at `now` (bounded: the notes are forgotten past 100,000 sessions). */
  private touched(id: string, now: number): void {
    this.lastTouch.set(id, now);
    if (this.lastTouch.size > 100_000) this.lastTouch.clear();
  }

  private async rotateOrWait(ref: SessionRef, generation: number): Promise<SessionRecord> {
    let result: RotationResult;
    try {
      result = await this.deps.rotator.rotate(ref, { kind: 'generation', generation });
    } catch (err) {
      if (!(err instanceof LockUnavailableError)) throw err;
      // Another replica holds the lock and is rotating: its generation arrives as an event.
      const newer = await this.deps.hub.waitForGeneration(
        ref,
        generation,
        this.options.refreshWaitMs,
      );
      if (newer) return newer;
      throw new UnavailableError('the session is being rotated elsewhere; retry', 500);
    }
    switch (result.outcome) {
      case 'reauth-required':
        throw new ReauthRequiredError(
          'the identity provider rejected the refresh token (invalid_grant)',
        );
      case 'not-found':
        throw new SessionNotFoundError(ref.tenant, ref.user);
      case 'persist-failed':
        throw new UnavailableError('the new token could not be stored; retry', 1_000, {
          detail: result.errorCode,
        });
      default:
        if (result.record) return result.record;
        return (await this.mustGet(ref)).record;
    }
  }

  private usable(record: SessionRecord): SessionRecord {
    switch (record.status) {
      case 'REAUTH_REQUIRED':
        throw new ReauthRequiredError(
          'the session needs re-authentication: its token family was rejected (invalid_grant)',
        );
      case 'REVOKED':
        throw new SessionInactiveError('the session was revoked');
      default:
        return record;
    }
  }

  private async reactivate(stored: StoredSession): Promise<StoredSession> {
    const ref = stored.record;
    return this.deps.locks.withLock(this.deps.keys.lock(ref), async () => {
      const current = await this.mustGet(ref);
      if (current.record.status !== 'IDLE') return current;
      const now = this.clock();
      const transition = reactivated(current.record, now, currentTraceparent());
      if (!(await this.deps.store.commit(transition, current.record.generation, now)))
        return this.mustGet(ref);
      return { ...current, record: transition.next };
    });
  }

  private async mustGet(ref: SessionRef): Promise<StoredSession> {
    const stored = await this.deps.store.get(ref);
    if (!stored) throw new SessionNotFoundError(ref.tenant, ref.user);
    return stored;
  }

  private checkOpen(): void {
    if (this.closing)
      throw new ShuttingDownError('the broker is shutting down; use another replica');
  }
}

/**
 * The longest refresh or subject token an Enroll may hand over. Real ones are a few KiB at most
 * (a Keycloak JWT with many roles); a longer one is refused before it is stored or forwarded.
 */
export const MAX_TOKEN_BYTES = 16 * 1024;

function checkTokenLength(token: string, field: string): void {
  if (Buffer.byteLength(token, 'utf8') > MAX_TOKEN_BYTES)
    throw new InvalidArgumentError(field, `is longer than ${MAX_TOKEN_BYTES} bytes`);
}

/** How an enrollment presents its credential to the IdP, once. */
interface FirstGrant {
  /** For messages: 'refresh token', 'login', 'token exchange'. */
  what: string;
  /** The request field holding the credential, named when the IdP rejects it. */
  field: string;
  /** How the IdP call is counted in the rotation metrics (an exchange is not a rotation). */
  counted: 'refresh' | 'login' | undefined;
  login: StoredLogin | undefined;
  present(signal: AbortSignal): Promise<TokenSet>;
  /** The refresh token the session keeps when the IdP answers without a new one. */
  keptRefreshToken: string;
}

/**
 * An IdP failure during enrollment, as the caller sees it; the IdP's own message stays in detail.
 * A credential the IdP rejects is the caller's bad argument (INVALID_ARGUMENT, naming the field:
 * retrying it can never work, and the broker is fine); a refusal of the broker's own client is
 * the operator's to fix (FAILED_PRECONDITION); the rest is UNAVAILABLE.
 */
function enrollmentFailure(err: unknown, first: FirstGrant, idp: string): unknown {
  if (!(err instanceof BrokerError)) return err;
  const options = { detail: `${err.message}${err.detail ? `: ${err.detail}` : ''}` };
  const name = JSON.stringify(idp);
  const nothing = 'no session was created or changed';
  if (err instanceof IdpInvalidGrantError)
    return new InvalidArgumentError(
      first.field,
      `was rejected by identity provider ${name} (invalid_grant: invalid, expired, revoked or already used); ${nothing}`,
    );
  if (err instanceof IdpLoginRejectedError)
    return new InvalidArgumentError(
      first.field,
      `was refused by identity provider ${name} (${err.message}); ${nothing}`,
    );
  if (err instanceof IdpInvalidClientError)
    return new BrokerClientRejectedError(
      `identity provider ${name} rejected the broker's own client configuration (${err.message}): ` +
        `fix the broker's client id, secret, auth method or the client's allowed grants at the IdP ` +
        `(TB_IDP_CLIENT_ID, TB_IDP_CLIENT_SECRET, TB_IDP_AUTH_METHOD, or its TB_IDPS_FILE entry); ` +
        `the caller's ${first.what} was not the problem; ${nothing}`,
      options,
    );
  if (err instanceof IdpTransientError)
    return new UnavailableError(
      `identity provider ${name} is unavailable for the ${first.what}; ${nothing}` +
        (err.outcomeUnknown && first.what !== 'login'
          ? `; the ${first.what} may have been used: if a retry says invalid_grant, obtain a new one`
          : '; retry'),
      err.retryAfterMs,
      options,
    );
  return new UnavailableError(
    `the ${first.what} failed at identity provider ${name} (${err.code}); ${nothing}`,
    undefined,
    options,
  );
}
