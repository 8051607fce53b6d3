import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';

import {
  type IdpAdapter,
  type IdpContext,
  type LoginCredentials,
  type RevokeOutcome,
  type TokenSet,
} from '../../broker/idp/idp-adapter.js';
import { LoginSecrets } from '../../broker/idp/login-secrets.js';
import { MemoryLockService } from '../../broker/lock/memory-lock-service.js';
import { RotationPolicy } from '../../broker/rotation/rotation-policy.js';
import { Rotator } from '../../broker/rotation/rotator.js';
import { KeySpace } from '../../broker/store/keys.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import {
  IdpInvalidGrantError,
  IdpLoginRejectedError,
  IdpTransientError,
} from '../../broker/errors.js';
import type { SessionRecord, StoredLogin } from '../../broker/store/session-record.js';

// Frozen clock; fake tokens compared with `===` only.
const T0 = 1_800_000_000_000;
const REF = { tenant: 'diku', user: 'system-user' };
const PASSWORD = 'pw-FAKE-0001';

type Step = () => Promise<TokenSet>;

/** A FOLIO-like IdP scripted per call, recording what each call was given. */
class ScriptedFolio implements IdpAdapter {
  readonly name = 'folio';
  readonly calls: {
    kind: 'refresh' | 'login';
    token?: string;
    password?: string;
    context: IdpContext;
  }[] = [];
  private readonly refreshes: Step[] = [];
  private readonly logins: Step[] = [];

  onRefresh(...steps: Step[]): this {
    this.refreshes.push(...steps);
    return this;
  }

  onLogin(...steps: Step[]): this {
    this.logins.push(...steps);
    return this;
  }

  refresh(refreshToken: string, _signal: AbortSignal, context: IdpContext): Promise<TokenSet> {
    this.calls.push({ kind: 'refresh', token: refreshToken, context });
    return (this.refreshes.shift() ?? unscripted)();
  }

  login(
    credentials: LoginCredentials,
    _signal: AbortSignal,
    context: IdpContext,
  ): Promise<TokenSet> {
    this.calls.push({ kind: 'login', password: credentials.password, context });
    return (this.logins.shift() ?? unscripted)();
  }

  revoke(): Promise<RevokeOutcome> {
    return Promise.resolve({ revoked: true });
  }

  count(kind: 'refresh' | 'login'): number {
    return this.calls.filter((c) => c.kind === kind).length;
  }
}

const unscripted: Step = () => Promise.reject(new Error('unscripted IdP call'));
const pair =
  (n: number): Step =>
  () =>
    Promise.resolve({
      accessToken: `at-${n}`,
      tokenType: 'Bearer',
      accessExpiresAt: now + 60_000,
      refreshToken: `rt-${n}`,
      refreshExpiresAt: now + 3_600_000,
    });
const fail =
  (err: Error): Step =>
  () =>
    Promise.reject(err);
const invalidGrant = () => fail(new IdpInvalidGrantError('HTTP 422: refresh token already used'));

let now: number;
let store: MemorySessionStore;
let idp: ScriptedFolio;
const dir = mkdtempSync(join(tmpdir(), 'tb-relogin-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function rotator(secrets?: LoginSecrets): Rotator {
  return new Rotator(
    {
      replica: 'r1',
      idpTimeoutMs: 2_000,
      lockMarginMs: 500,
      idleTimeoutMs: 600_000,
      busyRetryMs: 250,
      persistRetryMs: 300,
    },
    {
      store,
      locks: new MemoryLockService(10_000),
      keys: new KeySpace('tb:'),
      idps: new Map([[idp.name, idp]]),
      policy: new RotationPolicy(
        { ratio: 0.75, jitterRatio: 0, minLeadMs: 500, retryBaseMs: 200, retryMaxMs: 2_000 },
        () => 0.5,
      ),
      log: pino({ level: 'silent' }),
      clock: () => now,
      secrets,
    },
  );
}

/** A login session as Enroll writes it: no refresh token yet, due now. */
async function enrollLogin(login: StoredLogin = { username: 'sys', password: PASSWORD }) {
  const record: SessionRecord = {
    ...REF,
    idp: 'folio',
    generation: 0,
    status: 'ACTIVE',
    accessToken: '',
    tokenType: 'Bearer',
    accessExpiresAt: 0,
    refreshToken: '',
    refreshExpiresAt: 0,
    issuedAt: 0,
    nextRefreshAt: now,
    lastErrorCode: '',
    failedAttempts: 0,
    traceparent: '',
    login,
    reloginStreak: 0,
  };
  expect(await store.commit({ next: record, dueAt: undefined }, null, now)).toBe(true);
}

async function current(): Promise<SessionRecord> {
  const stored = await store.get(REF);
  if (!stored) throw new Error('session vanished');
  return stored.record;
}

beforeEach(() => {
  now = T0;
  store = new MemorySessionStore();
  idp = new ScriptedFolio();
});

describe('login sessions (system users)', () => {
  it('logs in at the first rotation, then refreshes, passing the session tenant to the IdP', async () => {
    await enrollLogin();
    idp.onLogin(pair(1)).onRefresh(pair(2));
    const r = rotator();
    expect((await r.rotate(REF, { kind: 'generation', generation: 0 })).outcome).toBe('rotated');
    expect((await r.rotate(REF, { kind: 'generation', generation: 1 })).outcome).toBe('rotated');
    expect(idp.calls.map((c) => c.kind)).toEqual(['login', 'refresh']);
    expect(idp.calls[0]!.password === PASSWORD).toBe(true);
    expect(idp.calls[1]!.token === 'rt-1').toBe(true);
    expect(
      idp.calls.every((c) => c.context.tenant === 'diku' && c.context.user === 'system-user'),
    ).toBe(true);
    const record = await current();
    expect(record.generation).toBe(2);
    expect(record.refreshToken === 'rt-2').toBe(true);
    expect(record.reloginStreak).toBe(0);
  });

  it('logs in again in the same rotation when the family ends (invalid_grant), presenting the dead RT once', async () => {
    await enrollLogin();
    idp.onLogin(pair(1), pair(2)).onRefresh(invalidGrant());
    const r = rotator();
    await r.rotate(REF, { kind: 'generation', generation: 0 });
    const result = await r.rotate(REF, { kind: 'generation', generation: 1 });
    expect(result.outcome).toBe('rotated');
    expect(idp.calls.map((c) => c.kind)).toEqual(['login', 'refresh', 'login']);
    const record = await current();
    expect(record.status).toBe('ACTIVE');
    expect(record.generation).toBe(2);
    expect(record.accessToken === 'at-2').toBe(true);
    expect(record.refreshToken === 'rt-2').toBe(true);
    expect(record.reloginStreak).toBe(1);
    expect(record.lastErrorCode).toBe('');
  });

  it('a refused login ends in REAUTH_REQUIRED after exactly one attempt (a wrong password does not loop)', async () => {
    await enrollLogin();
    idp
      .onLogin(
        pair(1),
        fail(new IdpLoginRejectedError('HTTP 422 password.incorrect: login refused')),
      )
      .onRefresh(invalidGrant());
    const r = rotator();
    await r.rotate(REF, { kind: 'generation', generation: 0 });
    const result = await r.rotate(REF, { kind: 'generation', generation: 1 });
    expect(result.outcome).toBe('reauth-required');
    expect(result.errorCode).toBe('IDP_LOGIN_REJECTED');
    expect(idp.count('login')).toBe(2);
    const record = await current();
    expect(record.status).toBe('REAUTH_REQUIRED');
    // Nothing else is attempted for a dead session.
    expect((await r.rotate(REF, { kind: 'due' })).outcome).toBe('inactive');
    expect(idp.calls).toHaveLength(3);
  });

  it('stops logging in again after 3 logins in a row without a successful refresh', async () => {
    await enrollLogin();
    idp.onLogin(pair(1), pair(2), pair(3), pair(4));
    idp.onRefresh(invalidGrant(), invalidGrant(), invalidGrant(), invalidGrant());
    const r = rotator();
    await r.rotate(REF, { kind: 'generation', generation: 0 });
    const outcomes = [];
    for (let generation = 1; generation <= 4; generation++)
      outcomes.push((await r.rotate(REF, { kind: 'generation', generation })).outcome);
    expect(outcomes).toEqual(['rotated', 'rotated', 'rotated', 'reauth-required']);
    expect(idp.count('login')).toBe(4);
    expect((await current()).lastErrorCode).toBe('IDP_INVALID_GRANT');
  });

  it('a successful refresh resets the bound', async () => {
    await enrollLogin();
    idp.onLogin(pair(1), pair(2)).onRefresh(invalidGrant(), pair(3));
    const r = rotator();
    await r.rotate(REF, { kind: 'generation', generation: 0 });
    await r.rotate(REF, { kind: 'generation', generation: 1 });
    expect((await current()).reloginStreak).toBe(1);
    await r.rotate(REF, { kind: 'generation', generation: 2 });
    expect((await current()).reloginStreak).toBe(0);
  });

  it('after invalid_grant and a login that fails transiently, the dead RT is never presented again', async () => {
    await enrollLogin();
    idp
      .onLogin(pair(1), fail(new IdpTransientError('HTTP 503', 1_000, true)), pair(2))
      .onRefresh(invalidGrant());
    const r = rotator();
    await r.rotate(REF, { kind: 'generation', generation: 0 });
    const failed = await r.rotate(REF, { kind: 'generation', generation: 1 });
    expect(failed.outcome).toBe('retry-scheduled');
    expect((await current()).refreshToken).toBe('');
    now += 1_000;
    expect((await r.rotate(REF, { kind: 'due' })).outcome).toBe('rotated');
    expect(idp.calls.map((c) => c.kind)).toEqual(['login', 'refresh', 'login', 'login']);
    expect((await current()).refreshToken === 'rt-2').toBe(true);
  });

  it('a session enrolled with a refresh token only is still REAUTH_REQUIRED on invalid_grant', async () => {
    await enrollLogin();
    const record = { ...(await current()), login: undefined, refreshToken: 'rt-0' };
    expect(await store.commit({ next: record, dueAt: undefined }, 0, now)).toBe(true);
    idp.onRefresh(invalidGrant());
    const result = await rotator().rotate(REF, { kind: 'generation', generation: 0 });
    expect(result.outcome).toBe('reauth-required');
    expect(idp.count('login')).toBe(0);
  });

  it('reads a password file under TB_SECRETS_DIR at each login; an unreadable one is retried', async () => {
    const file = 'sys-password';
    writeFileSync(join(dir, file), `${PASSWORD}\n`);
    await enrollLogin({ username: 'sys', passwordFile: file });
    idp.onLogin(pair(1), pair(2)).onRefresh(invalidGrant());
    const secrets = new LoginSecrets(dir);
    const r = rotator(secrets);
    await r.rotate(REF, { kind: 'generation', generation: 0 });
    expect(idp.calls[0]!.password === PASSWORD).toBe(true);
    writeFileSync(join(dir, file), 'pw-FAKE-rotated-0002');
    await r.rotate(REF, { kind: 'generation', generation: 1 });
    expect(idp.calls[2]!.password === 'pw-FAKE-rotated-0002').toBe(true);

    rmSync(join(dir, file));
    const record = { ...(await current()), refreshToken: '' };
    expect(await store.commit({ next: record, dueAt: undefined }, record.generation, now)).toBe(
      true,
    );
    const result = await r.rotate(REF, { kind: 'generation', generation: record.generation });
    expect(result.outcome).toBe('retry-scheduled');
    expect(result.errorCode).toBe('LOGIN_SECRET_UNREADABLE');
    expect(idp.calls).toHaveLength(3);
  });

  it('confines password files to TB_SECRETS_DIR', async () => {
    const secrets = new LoginSecrets(dir);
    for (const name of ['../etc/passwd', '/etc/passwd', ''])
      await expect(secrets.check(name, 'login.password_file')).rejects.toThrow(
        /^login\.password_file /,
      );
  });
});
