import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { AuditLog, type AuditCaller } from '../../broker/auth/audit-log.js';
import { ReauthRequiredError } from '../../broker/errors.js';
import { userHash } from '../../shared/telemetry/span-attributes.js';

const HOUR = 60 * 60 * 1000;
const USER = 'alice-4f1c-real-user-id';

const caller: AuditCaller = {
  namespace: 'folio',
  serviceAccount: 'mod-data-import',
  pod: 'mod-data-import-5d9f-abcde',
  podUid: '0b6f2c3e-1111-4a4a-9c9c-123456789abc',
};
const session = { tenant: 'diku', user: USER };

type Line = Record<string, unknown>;

function capture(level = 'info') {
  const raw: string[] = [];
  const log = pino({ name: 'token-broker', level }, { write: (s: string) => raw.push(s) });
  const lines = () => raw.map((s) => JSON.parse(s) as Line);
  return { log, raw, lines };
}

function fixedClock(start = 1_700_000_000_000) {
  const clock = { now: start, read: () => clock.now };
  return clock;
}

describe('AuditLog', () => {
  it('writes an enrollment as one audit line, with the user only hashed', () => {
    const { log, raw, lines } = capture();
    new AuditLog(log).enroll(caller, session, 'folio-modules');
    expect(lines()).toHaveLength(1);
    expect(lines()[0]).toMatchObject({
      name: 'token-broker',
      logger: 'audit',
      level: 30,
      subject: 'folio/mod-data-import',
      pod: 'mod-data-import-5d9f-abcde',
      podUid: '0b6f2c3e-1111-4a4a-9c9c-123456789abc',
      verb: 'enroll',
      tenant: 'diku',
      userHash: userHash(USER),
      outcome: 'allowed',
      rule: 'folio-modules',
    });
    expect(lines()[0]).not.toHaveProperty('reason');
    expect(raw.join('')).not.toContain(USER);
  });

  it('records a failed enrollment or revocation by its error code, never its message', () => {
    const { log, raw, lines } = capture();
    const audit = new AuditLog(log);
    audit.enroll(caller, session, 'r', new ReauthRequiredError('idp said: secret-detail-here'));
    audit.revoke(caller, session, 'r', new Error('something odd with secret-detail-here'));
    audit.revoke(caller, session, 'r');
    expect(lines().map((l) => [l.verb, l.outcome, l.rule])).toEqual([
      ['enroll', 'REAUTH_REQUIRED', 'r'],
      ['revoke', 'INTERNAL', 'r'],
      ['revoke', 'allowed', 'r'],
    ]);
    expect(raw.join('')).not.toContain('secret-detail-here');
    expect(raw.join('')).not.toContain(USER);
  });

  it('logs a read the first time per subject and session per hour', () => {
    const { log, lines } = capture();
    const clock = fixedClock();
    const audit = new AuditLog(log, clock.read);
    audit.read(caller, session, 'r');
    clock.now += 10 * 60 * 1000;
    audit.read(caller, session, 'r');
    audit.read({ ...caller, pod: 'another-replica' }, session, 'r'); // same subject
    expect(lines()).toHaveLength(1);
    expect(lines()[0]).toMatchObject({ verb: 'read', outcome: 'allowed', rule: 'r' });

    // Another session, or another subject, is a first read of its own.
    audit.read(caller, { tenant: 'diku', user: 'bob' }, 'r');
    audit.read(caller, { tenant: 'other', user: USER }, 'r');
    audit.read({ namespace: 'folio', serviceAccount: 'mod-users' }, session, 'r');
    expect(lines()).toHaveLength(4);

    // An hour after it was logged, the read is logged again.
    clock.now += 50 * 60 * 1000 - 1;
    audit.read(caller, session, 'r');
    expect(lines()).toHaveLength(4);
    clock.now += 1;
    audit.read(caller, session, 'r');
    expect(lines()).toHaveLength(5);
  });

  it('bounds the memory of first reads', () => {
    let count = 0;
    const log = pino({ level: 'info' }, { write: () => count++ });
    const clock = fixedClock();
    const audit = new AuditLog(log, clock.read);
    for (let i = 0; i < 100_000; i++) audit.read(caller, { tenant: 't', user: `u${i}` }, 'r');
    expect(count).toBe(100_000);
    audit.read(caller, { tenant: 't', user: 'u0' }, 'r');
    expect(count).toBe(100_000);
    // Full of recent entries: one more session makes it forget them rather than grow.
    audit.read(caller, { tenant: 't', user: 'one-too-many' }, 'r');
    audit.read(caller, { tenant: 't', user: 'u0' }, 'r');
    expect(count).toBe(100_002);
  });

  it('prunes only first reads older than an hour when that makes room', () => {
    let count = 0;
    const log = pino({ level: 'info' }, { write: () => count++ });
    const clock = fixedClock();
    const audit = new AuditLog(log, clock.read);
    audit.read(caller, { tenant: 't', user: 'old' }, 'r');
    clock.now += HOUR;
    for (let i = 0; i < 99_999; i++) audit.read(caller, { tenant: 't', user: `u${i}` }, 'r');
    audit.read(caller, { tenant: 't', user: 'new' }, 'r');
    expect(count).toBe(100_001);
    // The recent ones were kept: still not logged twice within the hour.
    audit.read(caller, { tenant: 't', user: 'u0' }, 'r');
    audit.read(caller, { tenant: 't', user: 'new' }, 'r');
    expect(count).toBe(100_001);
  });

  it('logs denials with their reason, and what was asked for', () => {
    const { log, raw, lines } = capture();
    const audit = new AuditLog(log);
    audit.denied(caller, 'revoke', session);
    audit.denied(caller, 'list', { tenant: 'diku' }, 'may not list tenant diku');
    audit.denied({ namespace: 'ops', serviceAccount: 'tbctl' }, 'list', {});
    expect(lines()).toMatchObject([
      {
        logger: 'audit',
        subject: 'folio/mod-data-import',
        pod: caller.pod,
        verb: 'revoke',
        tenant: 'diku',
        userHash: userHash(USER),
        outcome: 'denied',
        reason: 'no policy rule allows it',
      },
      { verb: 'list', tenant: 'diku', outcome: 'denied', reason: 'may not list tenant diku' },
      { subject: 'ops/tbctl', verb: 'list', outcome: 'denied' },
    ]);
    for (const line of lines()) expect(line).not.toHaveProperty('rule');
    expect(lines()[1]).not.toHaveProperty('userHash');
    expect(lines()[2]).not.toHaveProperty('pod');
    expect(raw.join('')).not.toContain(USER);
  });

  it('logs unauthenticated calls with their reason and origin, naming no subject', () => {
    const { log, lines } = capture();
    new AuditLog(log).unauthenticated('token expired', {
      rpc: '/tokenbroker.v1.TokenBroker/GetToken',
      peer: 'ipv4:127.0.0.1:51234',
    });
    new AuditLog(log).unauthenticated('no authorization header');
    expect(lines()).toMatchObject([
      {
        logger: 'audit',
        outcome: 'unauthenticated',
        reason: 'token expired',
        rpc: '/tokenbroker.v1.TokenBroker/GetToken',
        peer: 'ipv4:127.0.0.1:51234',
      },
      { outcome: 'unauthenticated', reason: 'no authorization header' },
    ]);
    expect(lines()[0]).not.toHaveProperty('subject');
  });

  it('keeps writing at info when the broker log is turned down, but not when silenced', () => {
    const quiet = capture('warn');
    new AuditLog(quiet.log).denied(caller, 'read', session);
    quiet.log.info('an ordinary info line');
    expect(quiet.lines()).toHaveLength(1);
    expect(quiet.lines()[0]).toMatchObject({ logger: 'audit', outcome: 'denied' });

    const silent = capture('silent');
    new AuditLog(silent.log).denied(caller, 'read', session);
    expect(silent.raw).toHaveLength(0);
  });
});
