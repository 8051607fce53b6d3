import { pino } from 'pino';
import { BrokerMetrics } from '../../broker/broker-metrics.js';
import { MetricSnapshot } from '../../shared/telemetry/metric-snapshot.js';
import { beforeEach, describe, expect, it } from 'vitest';

import {
  type IdpAdapter,
  type RevokeOutcome,
  type TokenSet,
} from '../../broker/idp/idp-adapter.js';
import type { HeldLock, LockService } from '../../broker/lock/lock-service.js';
import { MemoryLockService } from '../../broker/lock/memory-lock-service.js';
import { RotationPolicy } from '../../broker/rotation/rotation-policy.js';
import { Rotator, type RotatorOptions } from '../../broker/rotation/rotator.js';
import { KeySpace } from '../../broker/store/keys.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import {
  IdpInvalidClientError,
  IdpInvalidGrantError,
  IdpTransientError,
} from '../../broker/errors.js';
import type { SessionEvent, SessionRecord } from '../../broker/store/session-record.js';

// Frozen clock: every time below is a fixed epoch-ms number moved by hand.
const T0 = 1_800_000_000_000;
const REF = { tenant: 'diku', user: 'alice' };
const OPTIONS: RotatorOptions = {
  replica: 'replica-a',
  idpTimeoutMs: 2_000,
  lockMarginMs: 500,
  idleTimeoutMs: 60_000,
  busyRetryMs: 250,
  persistRetryMs: 300,
};

type Step = () => Promise<TokenSet>;

/** An IdP that answers each refresh from a script and records which refresh token it got. */
class ScriptedIdp implements IdpAdapter {
  readonly name = 'default';
  readonly presented: string[] = [];
  private readonly steps: Step[] = [];

  next(...steps: Step[]): this {
    this.steps.push(...steps);
    return this;
  }

  refresh(refreshToken: string, _signal: AbortSignal): Promise<TokenSet> {
    this.presented.push(refreshToken);
    const step = this.steps.shift();
    if (!step) return Promise.reject(new Error('unscripted IdP call'));
    return step();
  }

  revoke(): Promise<RevokeOutcome> {
    return Promise.resolve({ revoked: true });
  }
}

const tokens =
  (n: number, withRefreshToken = true): Step =>
  () =>
    Promise.resolve({
      accessToken: `at-${n}`,
      tokenType: 'Bearer',
      accessExpiresAt: now + 60_000,
      refreshToken: withRefreshToken ? `rt-${n}` : undefined,
    });
const failure =
  (err: Error): Step =>
  () =>
    Promise.reject(err);

let now: number;
let store: MemorySessionStore;
let idp: ScriptedIdp;
let metrics: MetricSnapshot;
let policy: RotationPolicy;
let events: SessionEvent[];

function rotator(locks: LockService = new MemoryLockService(1_000)): Rotator {
  return new Rotator(OPTIONS, {
    store,
    locks,
    keys: new KeySpace('tb:'),
    idps: new Map([[idp.name, idp]]),
    policy,
    metrics: new BrokerMetrics(metrics.meter),
    log: pino({ level: 'silent' }),
    clock: () => now,
  });
}

/** Generation 1: at-1/rt-1 issued now, valid 60 s, due in 45 s. */
async function seed(): Promise<SessionRecord> {
  const record: SessionRecord = {
    ...REF,
    idp: 'default',
    generation: 1,
    status: 'ACTIVE',
    accessToken: 'at-1',
    tokenType: 'Bearer',
    accessExpiresAt: now + 60_000,
    refreshToken: 'rt-1',
    refreshExpiresAt: now + 3_600_000,
    issuedAt: now,
    nextRefreshAt: now + 45_000,
    lastErrorCode: '',
    failedAttempts: 0,
    traceparent: '',
  };
  expect(await store.commit({ next: record, dueAt: record.nextRefreshAt }, null, now)).toBe(true);
  return record;
}

async function stored() {
  const current = await store.get(REF);
  if (!current) throw new Error('session vanished');
  return current;
}

/** A lock that is surely held only until `validUntil`. */
function shortLock(validFor: number): LockService {
  return {
    withLock<T>(_resource: string, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
      const until = now + validFor;
      return fn({ signal: new AbortController().signal, validUntil: () => until });
    },
    close: () => Promise.resolve(),
  };
}

beforeEach(async () => {
  now = T0;
  store = new MemorySessionStore();
  idp = new ScriptedIdp();
  metrics = new MetricSnapshot();
  policy = new RotationPolicy(
    { ratio: 0.75, jitterRatio: 0.05, minLeadMs: 500, retryBaseMs: 200, retryMaxMs: 2_000 },
    () => 0.5,
  );
  events = [];
  await store.subscribe((event) => events.push(event));
});

describe('Rotator', () => {
  it('shares one in-flight rotation between concurrent demands in this process', async () => {
    await seed();
    let answer!: () => void;
    const answered = new Promise<void>((resolve) => (answer = resolve));
    idp.next(async () => {
      await answered;
      return tokens(2)();
    });
    const r = rotator();
    const first = r.rotate(REF, { kind: 'generation', generation: 1 });
    const second = r.rotate(REF, { kind: 'due' });
    expect(r.inFlight).toBe(1);
    answer();
    const [a, b] = await Promise.all([first, second]);
    expect(a.outcome).toBe('rotated');
    expect(b.outcome).toBe('rotated');
    expect(a.record?.generation).toBe(2);
    expect(b.record?.generation).toBe(2);
    expect(idp.presented.length).toBe(1);
    expect(idp.presented[0] === 'rt-1').toBe(true);
    expect(await metrics.value('tb_broker_idp_request_duration_seconds')).toBe(1);
    expect(await metrics.value('tb_broker_rotations', { outcome: 'rotated' })).toBe(1);

    // A later demand for the old generation is already satisfied.
    const late = await r.rotate(REF, { kind: 'generation', generation: 1 });
    expect(late.outcome).toBe('not-needed');
    expect(late.record?.generation).toBe(2);
    expect(idp.presented.length).toBe(1);
    expect(r.inFlight).toBe(0);
  });

  it('does not call the IdP for a session that is not due yet, and reschedules it', async () => {
    const record = await seed();
    await store.schedule(REF, now); // a stale queue entry
    now += 10_000;
    const result = await rotator().rotate(REF, { kind: 'due' });
    expect(result.outcome).toBe('not-needed');
    expect(idp.presented.length).toBe(0);
    expect(await store.nextDueAt()).toBe(record.nextRefreshAt);
    expect(events).toEqual([{ ...REF, generation: 1, epoch: '' }]);

    now = record.nextRefreshAt;
    await store.touch(REF, now);
    idp.next(tokens(2));
    const due = await rotator().rotate(REF, { kind: 'due' });
    expect(due.outcome).toBe('rotated');
    const next = (await stored()).record;
    expect(next.generation).toBe(2);
    expect(next.accessToken === 'at-2').toBe(true);
    expect(next.refreshToken === 'rt-2').toBe(true);
    expect(next.issuedAt).toBe(now);
    expect(next.nextRefreshAt).toBe(policy.nextRefreshAt(now, now + 60_000));
    expect(await store.nextDueAt()).toBe(next.nextRefreshAt);
  });

  it('lets a due session that nobody used go idle without calling the IdP', async () => {
    const record = await seed();
    now = record.issuedAt + OPTIONS.idleTimeoutMs + 1;
    const result = await rotator().rotate(REF, { kind: 'due' });
    expect(result.outcome).toBe('went-idle');
    expect(idp.presented.length).toBe(0);
    const idle = (await stored()).record;
    expect(idle.status).toBe('IDLE');
    expect(idle.generation).toBe(2);
    expect(await store.nextDueAt()).toBeUndefined();
  });

  it('stays away while an earlier presentation may be in flight, then takes over', async () => {
    await seed();
    const deadline = now + 5_000;
    const mark = await store.markInflight(
      REF,
      { generation: 1, deadline, replica: 'replica-b', attemptId: 'earlier' },
      now,
    );
    expect(mark).toEqual({ kind: 'marked', tookOver: false });

    now += 1_000;
    const busy = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(busy.outcome).toBe('busy');
    expect(idp.presented.length).toBe(0);
    expect(await store.nextDueAt()).toBe(deadline + OPTIONS.busyRetryMs);
    expect(await metrics.value('tb_broker_takeovers')).toBe(0);

    now = deadline - 1;
    const stillBusy = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(stillBusy.outcome).toBe('busy');
    expect(idp.presented.length).toBe(0);

    now = deadline + 1; // the earlier call was aborted by now
    idp.next(tokens(2));
    const taken = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(taken.outcome).toBe('rotated');
    expect(await metrics.value('tb_broker_takeovers')).toBe(1);
    expect(idp.presented.length).toBe(1);
    const after = await stored();
    expect(after.record.generation).toBe(2);
    expect(after.inflight).toBeUndefined();
  });

  it('schedules a retry by the policy after a transient failure, keeping the generation', async () => {
    const record = await seed();
    idp.next(failure(new IdpTransientError('IdP down', undefined, false)));
    const result = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(result.outcome).toBe('retry-scheduled');
    expect(result.errorCode).toBe('IDP_UNAVAILABLE');
    const after = await stored();
    expect(after.record.generation).toBe(1);
    expect(after.record.status).toBe('ACTIVE');
    expect(after.record.failedAttempts).toBe(1);
    expect(after.record.lastErrorCode).toBe('IDP_UNAVAILABLE');
    expect(after.record.accessToken === record.accessToken).toBe(true);
    expect(after.record.refreshToken === record.refreshToken).toBe(true);
    expect(after.inflight).toBeUndefined();
    const retryAt = policy.retryAt(now, 1, undefined, record.accessExpiresAt);
    expect(after.record.nextRefreshAt).toBe(retryAt);
    expect(await store.nextDueAt()).toBe(retryAt);
    expect(retryAt - now).toBeGreaterThanOrEqual(100);
    expect(retryAt - now).toBeLessThanOrEqual(200);
    expect(await metrics.value('tb_broker_rotations', { outcome: 'retry-scheduled' })).toBe(1);
    // Same generation: nothing new was published.
    expect(events.map((e) => e.generation)).toEqual([1]);

    // The second failure backs off further and honours Retry-After.
    now = retryAt;
    // An HTTP answer (429 with Retry-After): a known outcome, the token was not consumed.
    idp.next(failure(new IdpTransientError('slow down', 5_000, true, { answered: true })));
    const second = await rotator().rotate(REF, { kind: 'due' });
    expect(second.outcome).toBe('retry-scheduled');
    const again = (await stored()).record;
    expect(again.failedAttempts).toBe(2);
    expect(again.nextRefreshAt).toBe(now + 5_000);
    expect(idp.presented.length).toBe(2);
    expect(idp.presented.every((rt) => rt === 'rt-1')).toBe(true);
  });

  it('turns invalid_grant into REAUTH_REQUIRED: a new generation, never retried', async () => {
    await seed();
    idp.next(failure(new IdpInvalidGrantError('invalid_grant')));
    const result = await rotator().rotate(REF, { kind: 'due' });
    // Not due yet, so the IdP is not asked; force it with a generation demand.
    expect(result.outcome).toBe('not-needed');
    const forced = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(forced.outcome).toBe('reauth-required');
    expect(forced.errorCode).toBe('IDP_INVALID_GRANT');
    const after = (await stored()).record;
    expect(after.generation).toBe(2);
    expect(after.status).toBe('REAUTH_REQUIRED');
    expect(after.lastErrorCode).toBe('IDP_INVALID_GRANT');
    expect(after.nextRefreshAt).toBe(0);
    expect(await store.nextDueAt()).toBeUndefined();
    expect(await metrics.value('tb_broker_rotations', { outcome: 'reauth-required' })).toBe(1);
    expect(await metrics.value('tb_broker_rotations', { outcome: 'retry-scheduled' })).toBe(0);
    expect(events.map((e) => e.generation)).toEqual([1, 2]);

    now += 60_000;
    const later = await rotator().rotate(REF, { kind: 'due' });
    expect(later.outcome).toBe('inactive');
    expect(idp.presented.length).toBe(1);
  });

  it('retries invalid_client (a configuration error) instead of killing the session', async () => {
    await seed();
    idp.next(failure(new IdpInvalidClientError('invalid_client')));
    const result = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(result.outcome).toBe('retry-scheduled');
    const after = (await stored()).record;
    expect(after.status).toBe('ACTIVE');
    expect(after.generation).toBe(1);
    expect(after.lastErrorCode).toBe('IDP_INVALID_CLIENT');
    expect(after.failedAttempts).toBe(1);
    expect(await store.nextDueAt()).toBe(after.nextRefreshAt);
    expect(after.nextRefreshAt).toBeGreaterThan(now);
  });

  it('does not present the token when the lock would not outlast the IdP call', async () => {
    await seed();
    // The call may take idpTimeoutMs and must end lockMarginMs before the lock: 1 ms short.
    const tooShort = OPTIONS.idpTimeoutMs + OPTIONS.lockMarginMs - 1;
    const result = await rotator(shortLock(tooShort)).rotate(REF, {
      kind: 'generation',
      generation: 1,
    });
    expect(result.outcome).toBe('busy');
    expect(idp.presented.length).toBe(0);
    expect((await stored()).inflight).toBeUndefined();
    expect(await store.nextDueAt()).toBe(now + OPTIONS.busyRetryMs);

    idp.next(tokens(2));
    const enough = await rotator(shortLock(tooShort + 1)).rotate(REF, {
      kind: 'generation',
      generation: 1,
    });
    expect(enough.outcome).toBe('rotated');
    expect(idp.presented.length).toBe(1);
  });

  it('keeps the old refresh token when the IdP does not rotate it', async () => {
    const record = await seed();
    idp.next(tokens(2, false));
    const result = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(result.outcome).toBe('rotated');
    const after = (await stored()).record;
    expect(after.generation).toBe(2);
    expect(after.accessToken === 'at-2').toBe(true);
    expect(after.refreshToken === 'rt-1').toBe(true);
    expect(after.refreshExpiresAt).toBe(record.refreshExpiresAt);

    idp.next(tokens(3));
    await rotator().rotate(REF, { kind: 'generation', generation: 2 });
    expect(idp.presented[1] === 'rt-1').toBe(true);
    expect((await stored()).record.refreshToken === 'rt-3').toBe(true);
  });

  it('keeps retrying the store under the lock, and stores the pair once it is back', async () => {
    await seed();
    const commit = store.commit.bind(store);
    let failures = 0;
    store.commit = (transition, expected, at) => {
      if (transition.next.generation === 2 && failures < 2) {
        failures++;
        return Promise.reject(new Error('store down'));
      }
      return commit(transition, expected, at);
    };
    idp.next(tokens(2));
    const result = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(result.outcome).toBe('rotated');
    expect(failures).toBe(2);
    expect(await metrics.value('tb_broker_persist_failures')).toBe(0);
    expect((await stored()).record.generation).toBe(2);
    expect(idp.presented.length).toBe(1);
  });

  it('never publishes a generation it could not store', async () => {
    await seed();
    const commit = store.commit.bind(store);
    store.commit = (transition, expected, at) =>
      transition.next.generation === 2
        ? Promise.reject(new Error('store down'))
        : commit(transition, expected, at);
    idp.next(tokens(2));
    const result = await rotator().rotate(REF, { kind: 'generation', generation: 1 });
    expect(result.outcome).toBe('persist-failed');
    expect(result.record).toBeUndefined();
    expect(await metrics.value('tb_broker_persist_failures')).toBe(1);
    expect(await metrics.value('tb_broker_rotations', { outcome: 'rotated' })).toBe(0);
    expect((await stored()).record.generation).toBe(1);
    expect(events.map((e) => e.generation)).toEqual([1]);
  });
});
