import type { Logger } from 'pino';
import { idProblem, MAX_ID_LENGTH } from '../shared/session-ref.js';
import { currentTraceparent } from '../shared/telemetry/trace-context.js';
import {
  BrokerError,
  errorCode,
  IdpInvalidClientError,
  IdpInvalidGrantError,
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
   * token exchange (a new family issued to the broker). Re-enrolling an existing session replaces
   * its family and keeps its generation rising.
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
    if (credential.kind === 'token_exchange')
      return this.enrollByExchange(ref, idpName, idp, credential, input.enrolledBy);

    let seed: FamilySeed;
    if (credential.kind === 'refresh_token') {
      if (!credential.refreshToken) throw new InvalidArgumentError('refresh_token', 'is required');
      checkTokenLength(credential.refreshToken, 'refresh_token');
      seed = {
        refreshToken: credential.refreshToken,
        login: undefined,
        enrolledBy: input.enrolledBy,
      };
    } else {
      seed = {
        refreshToken: '',
        login: await this.checkLogin(idp, credential),
        enrolledBy: input.enrolledBy,
      };
    }
    const generation = await this.replaceFamily(ref, idpName, seed, this.clock());
    await this.deps.store.touch(ref, this.clock());
    // The first rotation presents the dedicated refresh token, or logs in.
    const result = await this.deps.rotator.rotate(ref, { kind: 'generation', generation });
    if (result.outcome === 'reauth-required')
      throw new ReauthRequiredError(
        credential.kind === 'login'
          ? 'the identity provider refused the login'
          : 'the identity provider rejected the refresh token (invalid_grant)',
      );
    return metadataOf(await this.mustGet(ref));
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

  /**
   * The exchange needs no lock: it presents no refresh token, and the user's own family is left
   * alone. Only storing the new family is serialised with rotations.
   */
  private async enrollByExchange(
    ref: SessionRef,
    idpName: string,
    idp: IdpAdapter,
    exchange: Extract<EnrollCredential, { kind: 'token_exchange' }>,
    enrolledBy: string | undefined,
  ): Promise<SessionMetadata> {
    if (!idp.exchange)
      throw new InvalidArgumentError(
        'token_exchange',
        `is not supported by identity provider ${JSON.stringify(idp.name)}`,
      );
    if (!exchange.subjectToken)
      throw new InvalidArgumentError('token_exchange.subject_token', 'is required');
    checkTokenLength(exchange.subjectToken, 'token_exchange.subject_token');
    const issuedAt = this.clock();
    let tokens: TokenSet;
    try {
      tokens = await idp.exchange(
        { token: exchange.subjectToken, tokenType: exchange.subjectTokenType ?? '' },
        AbortSignal.timeout(this.options.idpTimeoutMs ?? 5_000),
        ref,
      );
    } catch (err) {
      this.deps.log.warn(
        {
          tenant: ref.tenant,
          code: (err as { code?: unknown }).code,
          err: errorText(err),
          detail: (err as { detail?: unknown }).detail,
        },
        'token exchange failed',
      );
      throw enrollmentFailure(err, 'token exchange');
    }
    const generation = await this.replaceFamily(
      ref,
      idpName,
      { refreshToken: tokens.refreshToken ?? '', login: undefined, enrolledBy },
      issuedAt,
      tokens,
    );
    await this.deps.store.touch(ref, this.clock());
    this.deps.log.info({ tenant: ref.tenant, generation }, 'enrolled by token exchange');
    return metadataOf(await this.mustGet(ref));
  }

  /**
   * Writes the session's new family under its lock. Without `tokens` the family still has to be
   * rotated (or logged into): it is due now, and the due queue is the safety net if this replica
   * dies before doing so. With `tokens` (an exchange) it is a new generation, published at once.
   */
  private replaceFamily(
    ref: SessionRef,
    idp: string,
    seed: FamilySeed,
    now: number,
    tokens?: TokenSet,
  ): Promise<number> {
    return this.deps.locks.withLock(this.deps.keys.lock(ref), async () => {
      const previous = (await this.deps.store.get(ref))?.record;
      const issued = tokens && {
        tokens,
        nextRefreshAt: this.deps.rotator.nextRefreshAt(now, tokens.accessExpiresAt),
      };
      const transition = enrolled(
        ref,
        idp,
        seed,
        previous,
        { now, traceparent: currentTraceparent() },
        issued,
      );
      const expected = previous ? previous.generation : null;
      if (!(await this.deps.store.commit(transition, expected, now)))
        throw new UnavailableError('session changed during enrollment; retry');
      return transition.next.generation;
    });
  }

  /** The current access token; reactivates an idle session, rotates one that has none valid. */
  async getToken(input: Partial<SessionRef>): Promise<SessionRecord> {
    this.checkOpen();
    const ref = validateRef(input);
    let stored = await this.mustGet(ref);
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
    this.lastTouch.set(id, now);
    if (this.lastTouch.size > 100_000) this.lastTouch.clear();
    await this.deps.store.touch(ref, now);
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

/** An IdP failure during enrollment, as the caller sees it; the IdP's own message stays in detail. */
function enrollmentFailure(err: unknown, what: string): unknown {
  if (!(err instanceof BrokerError)) return err;
  const options = { detail: `${err.message}${err.detail ? `: ${err.detail}` : ''}` };
  if (err instanceof IdpInvalidGrantError)
    return new ReauthRequiredError(
      `the identity provider rejected the ${what} (invalid_grant)`,
      options,
    );
  if (err instanceof IdpTransientError)
    return new UnavailableError(
      `the identity provider is unavailable for the ${what}; retry`,
      err.retryAfterMs,
      options,
    );
  if (err instanceof IdpInvalidClientError)
    return new InvalidArgumentError(
      'token_exchange',
      "is refused for the broker's client by the identity provider (invalid_client, unauthorized_client or unsupported_grant_type)",
    );
  return new UnavailableError(
    `the ${what} failed at the identity provider (${err.code})`,
    undefined,
    options,
  );
}
