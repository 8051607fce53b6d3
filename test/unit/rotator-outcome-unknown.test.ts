import { pino } from 'pino';
import { beforeEach, describe, expect, it } from 'vitest';
import { BrokerMetrics } from '../../broker/broker-metrics.js';
import {
  IdpInvalidGrantError,
  IdpTransientError,
  LockUnavailableError,
} from '../../broker/errors.js';
import type { IdpAdapter, RevokeOutcome, TokenSet } from '../../broker/idp/idp-adapter.js';
import type { HeldLock, LockService } from '../../broker/lock/lock-service.js';
import { MemoryLockService } from '../../broker/lock/memory-lock-service.js';
import { RotationPolicy } from '../../broker/rotation/rotation-policy.js';
import { Rotator, type IdpRotationSemantics } from '../../broker/rotation/rotator.js';
import { KeySpace } from '../../broker/store/keys.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import type { SessionRecord } from '../../broker/store/session-record.js';
import { MetricSnapshot } from '../../shared/telemetry/metric-snapshot.js';

/**
 * Issue 12: what the rotator does when a presentation's answer is lost (sent, no HTTP answer),
 * in this order: introspection only when it is known to work for refresh tokens, the IdP's reuse
 * grace period, otherwise one more presentation that the session shows. HTTP answers (503, 429)
 * are known outcomes. A fake IdP and a frozen clock; the multi-process proof is in
 * test/integration/lost-answers.test.ts.
 */
const T0 = 1_800_000_000_000;
const REF = { tenant: 'diku', user: 'alice' };
const BOB = { tenant: 'diku', user: 'bob' };

type Step = () => Promise<TokenSet>;

/** Refreshes answered from a script; introspection answered by `introspect` (counted). */
class FakeIdp implements IdpAdapter {
  readonly name = 'default';
  readonly presented: string[] = [];
  readonly introspected: string[] = [];
  private readonly steps: Step[] = [];
  introspect: (token: string) => boolean | undefined = () => true;

  next(...steps: Step[]): this {
    this.steps.push(...steps);
    return this;
  }

  refresh(refreshToken: string): Promise<TokenSet> {
    this.presented.push(refreshToken);
    const step = this.steps.shift();
    if (!step) return Promise.reject(new Error('unscripted IdP call'));
    return step();
  }

  revoke(): Promise<RevokeOutcome> {
    return Promise.resolve({ revoked: true });
  }

  isActive(refreshToken: string): Promise<boolean | undefined> {
    this.introspected.push(refreshToken);
    return Promise.resolve(this.introspect(refreshToken));
  }
}

const tokens =
  (n: number): Step =>
  () =>
    Promise.resolve({
      accessToken: `at-${n}`,
      tokenType: 'Bearer',
      accessExpiresAt: now + 60_000,
      refreshToken: `rt-${n}`,
    });
const lost: Step = () =>
  Promise.reject(new IdpTransientError('connection reset after sending', undefined, true));
const answered503: Step = () =>
  Promise.reject(
    new IdpTransientError('HTTP 503', undefined, true, {
      answered: true,
    }),
  );
const invalidGrant: Step = () => Promise.reject(new IdpInvalidGrantError('HTTP 400 invalid_grant'));

let now: number;
let store: MemorySessionStore;
let idp: FakeIdp;
let metrics: MetricSnapshot;
let logLines: Record<string, unknown>[];

function rotator(
  semantics: Partial<IdpRotationSemantics> = {},
  locks: LockService = new MemoryLockService(1_000),
): Rotator {
  const sink = {
    write: (line: string) => logLines.push(JSON.parse(line) as Record<string, unknown>),
  };
  return new Rotator(
    {
      replica: 'replica-a',
      idpTimeoutMs: 2_000,
      lockMarginMs: 500,
      idleTimeoutMs: 600_000,
      busyRetryMs: 250,
      persistRetryMs: 300,
    },
    {
      store,
      locks,
      keys: new KeySpace('tb:'),
      idps: new Map([[idp.name, idp]]),
      policy: new RotationPolicy(),
      metrics: new BrokerMetrics(metrics.meter),
      log: pino({ level: 'info' }, sink),
      clock: () => now,
      semantics: new Map([
        [idp.name, { reuseGraceMs: 0, refreshIntrospection: 'probe', ...semantics }],
      ]),
    },
  );
}

async function seed(ref = REF): Promise<void> {
  const record: SessionRecord = {
    ...ref,
    idp: 'default',
    generation: 1,
    status: 'ACTIVE',
    accessToken: 'at-1',
    tokenType: 'Bearer',
    accessExpiresAt: now + 60_000,
    refreshToken: ref === REF ? 'rt-1' : `rt-${ref.user}`,
    refreshExpiresAt: 0,
    issuedAt: now,
    nextRefreshAt: now + 45_000,
    lastErrorCode: '',
    failedAttempts: 0,
    traceparent: '',
  };
  expect(await store.commit({ next: record, dueAt: record.nextRefreshAt }, null, now)).toBe(true);
}

async function record(): Promise<SessionRecord> {
  const current = await store.get(REF);
  if (!current) throw new Error('session vanished');
  return current.record;
}

/** Rotates the current generation on demand. */
async function rotateNow(r: Rotator) {
  return r.rotate(REF, { kind: 'generation', generation: (await record()).generation });
}
const logged = (text: string) => logLines.filter((l) => String(l.msg).includes(text));

beforeEach(async () => {
  now = T0;
  store = new MemorySessionStore();
  idp = new FakeIdp();
  metrics = new MetricSnapshot();
  logLines = [];
  await seed();
});

describe('a lost answer, with introspection probed and working', () => {
  it('asks, never presents a consumed token again, and ends the session without invalid_grant', async () => {
    const r = rotator();
    idp.next(tokens(2), lost);
    expect((await rotateNow(r)).outcome).toBe('rotated');
    // The probe asked about rt-2, which the broker had just received: active, so trusted.
    expect(idp.introspected).toEqual(['rt-2']);
    expect(r.introspection.state(idp)).toBe('usable');

    idp.introspect = () => false;
    const result = await rotateNow(r);
    expect(result.outcome).toBe('reauth-required');
    expect(idp.presented).toEqual(['rt-1', 'rt-2']);
    const after = await record();
    expect(after.status).toBe('REAUTH_REQUIRED');
    expect(after.lastErrorCode).toBe('IDP_TOKEN_CONSUMED');
    expect(logLines.some((l) => String(l.msg).includes('invalid_grant'))).toBe(false);
    expect(
      await metrics.value('tb_broker_outcome_unknown', { resolution: 'introspected-consumed' }),
    ).toBe(1);
  });

  it('presents again at once when introspection says the token is still active', async () => {
    const r = rotator();
    idp.next(tokens(2), lost, tokens(3));
    await rotateNow(r);
    const result = await rotateNow(r);
    expect(result.outcome).toBe('rotated');
    expect(idp.presented).toEqual(['rt-1', 'rt-2', 'rt-2']);
    expect((await record()).lastErrorCode).toBe('');
    expect(
      await metrics.value('tb_broker_outcome_unknown', { resolution: 'introspected-active' }),
    ).toBe(1);
  });
});

describe('the introspection probe', () => {
  it('after a failed probe, probes again only 10 s later (a probe holds the lock)', async () => {
    idp.introspect = () => {
      throw new Error('introspection endpoint down');
    };
    const r = rotator();
    idp.next(tokens(2), tokens(3), tokens(4));
    await rotateNow(r);
    expect(idp.introspected).toEqual(['rt-2']);
    expect(r.introspection.state(idp)).toBe('unprobed');
    idp.introspect = () => true;
    now += 5_000;
    await rotateNow(r);
    expect(idp.introspected).toEqual(['rt-2']);
    now += 5_000;
    await rotateNow(r);
    expect(idp.introspected).toEqual(['rt-2', 'rt-4']);
    expect(r.introspection.state(idp)).toBe('usable');
  });
});

describe('introspection that knows only access tokens', () => {
  it('is found unusable by the probe, logged and counted, and ends no session', async () => {
    idp.introspect = () => false;
    const r = rotator();
    idp.next(tokens(2), lost, tokens(3));
    expect((await rotateNow(r)).outcome).toBe('rotated');
    expect(r.introspection.state(idp)).toBe('unusable');
    expect(logged('introspection answered active:false').length).toBe(1);
    expect(logged('introspection answered active:false')[0]!.level).toBe(50);
    expect(await metrics.value('tb_broker_introspection_unusable', { idp: 'default' })).toBe(1);

    // The lost answer is not put to the unusable introspection: presented again once, shown.
    const asked = idp.introspected.length;
    const result = await rotateNow(r);
    expect(idp.introspected.length).toBe(asked);
    expect(result.outcome).toBe('rotated');
    expect(idp.presented).toEqual(['rt-1', 'rt-2', 'rt-2']);
    const after = await record();
    expect(after.status).toBe('ACTIVE');
    expect(after.lastErrorCode).toBe('OUTCOME_UNKNOWN_REPRESENTED');
    expect(logged('presenting it again once').length).toBe(1);
  });

  it('before any probe, an inactive answer is not believed: deferred until a probe decides', async () => {
    // The lost answer consumed rt-1; tokens the IdP has just issued are active.
    idp.introspect = (token) => token !== 'rt-1';
    const r = rotator();
    idp.next(lost);
    expect((await rotateNow(r)).outcome).toBe('retry-scheduled');
    expect(idp.presented).toEqual(['rt-1']);
    expect((await record()).outcomeUnknown).toBe(true);
    expect((await record()).status).toBe('ACTIVE');
    expect(await metrics.value('tb_broker_outcome_unknown', { resolution: 'deferred' })).toBe(1);

    // Another session's rotation probes introspection on a live token: usable.
    await seed(BOB);
    idp.next(tokens(9));
    expect((await r.rotate(BOB, { kind: 'generation', generation: 1 })).outcome).toBe('rotated');
    expect(r.introspection.state(idp)).toBe('usable');

    // Now the inactive answer is believed: consumed, never presented again.
    now += 1_000;
    expect((await rotateNow(r)).outcome).toBe('reauth-required');
    expect(idp.presented.filter((t) => t === 'rt-1')).toHaveLength(1);
    expect((await record()).lastErrorCode).toBe('IDP_TOKEN_CONSUMED');
  });

  it('an unprobed inactive answer defers no longer than the access token allows, then presents once', async () => {
    idp.introspect = () => false;
    const r = rotator();
    idp.next(lost, tokens(2));
    expect((await rotateNow(r)).outcome).toBe('retry-scheduled');
    expect(idp.presented).toEqual(['rt-1']);
    // Two send timeouts before the access token expires, the broker decides without the probe.
    now = (await record()).accessExpiresAt - 2 * 2_000;
    const result = await rotateNow(r);
    expect(result.outcome).toBe('rotated');
    expect(idp.presented).toEqual(['rt-1', 'rt-1']);
    expect((await record()).status).toBe('ACTIVE');
    expect((await record()).lastErrorCode).toBe('OUTCOME_UNKNOWN_REPRESENTED');
  });

  it('one 503 with introspection on: a known outcome, no question, no session ended', async () => {
    idp.introspect = () => false;
    const r = rotator();
    idp.next(answered503);
    const result = await rotateNow(r);
    expect(result.outcome).toBe('retry-scheduled');
    expect(idp.introspected).toEqual([]);
    const after = await record();
    expect(after.status).toBe('ACTIVE');
    expect(after.outcomeUnknown).toBeFalsy();
    // The retry presents the same token, without asking first.
    now = after.nextRefreshAt;
    idp.next(tokens(2));
    expect((await r.rotate(REF, { kind: 'due' })).outcome).toBe('rotated');
    expect(idp.presented).toEqual(['rt-1', 'rt-1']);
    expect(idp.introspected).toEqual(['rt-2']);
  });
});

describe('a lost answer without usable introspection', () => {
  it('inside the reuse grace period: presents again safely, nothing to show', async () => {
    const r = rotator({ reuseGraceMs: 30_000, refreshIntrospection: 'off' });
    idp.next(lost, tokens(2));
    const result = await rotateNow(r);
    expect(result.outcome).toBe('rotated');
    expect(idp.presented).toEqual(['rt-1', 'rt-1']);
    expect(idp.introspected).toEqual([]);
    expect((await record()).lastErrorCode).toBe('');
    expect(
      await metrics.value('tb_broker_outcome_unknown', { resolution: 'grace-represented' }),
    ).toBe(1);
  });

  it('with neither: presents again at most once; a refusal ends the session as OUTCOME_UNKNOWN_REPRESENTED', async () => {
    const r = rotator({ refreshIntrospection: 'off' });
    idp.next(lost, invalidGrant);
    const result = await rotateNow(r);
    expect(result.outcome).toBe('reauth-required');
    expect(idp.presented).toEqual(['rt-1', 'rt-1']);
    const after = await record();
    expect(after.status).toBe('REAUTH_REQUIRED');
    expect(after.lastErrorCode).toBe('OUTCOME_UNKNOWN_REPRESENTED');
  });

  it('a second lost answer is not presented a third time in the same attempt', async () => {
    const r = rotator({ refreshIntrospection: 'off' });
    idp.next(lost, lost);
    const result = await rotateNow(r);
    expect(result.outcome).toBe('retry-scheduled');
    expect(idp.presented).toEqual(['rt-1', 'rt-1']);
    expect((await record()).outcomeUnknown).toBe(true);
  });
});

describe('the lock is lost while waiting for the answer', () => {
  it('aborts, records the outcome as unknown and presents nothing more in that attempt', async () => {
    const controller = new AbortController();
    const locks: LockService = {
      async withLock<T>(_resource: string, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
        return fn({ signal: controller.signal, validUntil: () => now + 10_000 });
      },
      close: () => Promise.resolve(),
    };
    const r = rotator({ refreshIntrospection: 'off' }, locks);
    idp.next(() => {
      controller.abort(new LockUnavailableError('lock extension failed'));
      return lost();
    });
    const result = await rotateNow(r);
    expect(result.outcome).toBe('retry-scheduled');
    expect(idp.presented).toEqual(['rt-1']);
    const after = await record();
    expect(after.outcomeUnknown).toBe(true);
    expect(after.status).toBe('ACTIVE');
  });
});
