/**
 * The audit trail: who (namespace/serviceaccount, and which pod) did what to which session, and
 * whether it was allowed. One JSON line per event on the broker's log stream, told apart by the
 * field `logger: "audit"` (a child logger cannot rename pino's `name` without a duplicate key).
 * Users appear only as `userHash`; no method takes a token, so none can be logged.
 *
 * Line fields: subject ("ns/sa"), pod, podUid, verb, tenant, userHash, outcome ("allowed",
 * "denied", "unauthenticated" or an error code), rule (when a rule allowed), reason (when denied
 * or unauthenticated), rpc and peer (when the caller gave them).
 */
import type { Logger } from 'pino';
import { userHash } from '../../shared/telemetry/span-attributes.js';
import type { Caller, SessionName, Verb } from './access-policy.js';

/** The verified caller: its ServiceAccount, plus the pod named in its token when there is one. */
export interface AuditCaller extends Caller {
  pod?: string;
  podUid?: string;
}

/** Where an unauthenticated call came from, as far as the server knows it. */
export interface AuditPeer {
  /** The RPC method, e.g. `/tokenbroker.v1.TokenBroker/GetToken`. */
  rpc?: string;
  /** grpc-js `call.getPeer()`, e.g. `ipv4:10.0.0.7:51234`. */
  peer?: string;
}

/** A first read is logged again after this long. */
const READ_REPEAT_MS = 60 * 60 * 1000;
/** Bounds the first-read memory; past it, entries older than an hour go (all of them if need be). */
const MAX_READ_ENTRIES = 100_000;

export class AuditLog {
  private readonly log: Logger;
  /** (subject, tenant, user) to when its read was last logged. */
  private readonly reads = new Map<string, number>();

  constructor(
    log: Logger,
    private readonly clock: () => number = Date.now,
  ) {
    // An audit trail must not vanish because the operator turned logs down to warn; only an
    // explicit `silent` (tests) silences it.
    const level =
      log.level === 'silent' || log.levelVal <= log.levels.values.info! ? log.level : 'info';
    this.log = log.child({ logger: 'audit' }, { level });
  }

  /** An enrollment the policy allowed, after it ran: `error` is what it failed with, if it did. */
  enroll(caller: AuditCaller, session: SessionName, rule: string, error?: unknown): void {
    this.write(caller, 'enroll', session, error === undefined ? 'allowed' : outcomeOf(error), {
      rule,
    });
  }

  /** A revocation the policy allowed, after it ran: `error` is what it failed with, if it did. */
  revoke(caller: AuditCaller, session: SessionName, rule: string, error?: unknown): void {
    this.write(caller, 'revoke', session, error === undefined ? 'allowed' : outcomeOf(error), {
      rule,
    });
  }

  /**
   * A read (GetToken, or a Watch subscription) the policy allowed. Logged only the first time per
   * (subject, session) per hour: sidecars read all the time, and the trail is for who may see what.
   */
  read(caller: AuditCaller, session: SessionName, rule: string): void {
    const now = this.clock();
    const key = `${caller.namespace}/${caller.serviceAccount}\u0000${session.tenant}\u0000${session.user}`;
    const last = this.reads.get(key);
    if (last !== undefined && now - last < READ_REPEAT_MS) return;
    if (last === undefined && this.reads.size >= MAX_READ_ENTRIES) this.prune(now);
    this.reads.set(key, now);
    this.write(caller, 'read', session, 'allowed', { rule });
  }

  /**
   * A call the policy refused. `session` is what was asked for (ListSessions may name only a
   * tenant, or nothing).
   */
  denied(
    caller: AuditCaller,
    verb: Verb,
    session: Partial<SessionName>,
    reason = 'no policy rule allows it',
  ): void {
    this.write(caller, verb, session, 'denied', { reason });
  }

  /**
   * A call without a valid caller token. `reason` says what was wrong (missing header, expired,
   * wrong audience...) and must not contain the token.
   */
  unauthenticated(reason: string, peer: AuditPeer = {}): void {
    this.log.info(
      { outcome: 'unauthenticated', reason, rpc: peer.rpc, peer: peer.peer },
      'audit unauthenticated',
    );
  }

  private write(
    caller: AuditCaller,
    verb: Verb,
    session: Partial<SessionName>,
    outcome: string,
    extra: { rule?: string; reason?: string },
  ): void {
    this.log.info(
      {
        subject: `${caller.namespace}/${caller.serviceAccount}`,
        pod: caller.pod,
        podUid: caller.podUid,
        verb,
        tenant: session.tenant,
        userHash: session.user === undefined ? undefined : userHash(session.user),
        outcome,
        ...extra,
      },
      `audit ${verb} ${outcome}`,
    );
  }

  private prune(now: number): void {
    for (const [key, at] of this.reads) if (now - at >= READ_REPEAT_MS) this.reads.delete(key);
    // Every entry is recent (a flood of distinct sessions): forget them all rather than grow.
    if (this.reads.size >= MAX_READ_ENTRIES) this.reads.clear();
  }
}

/** The outcome of a call that failed: its stable error code, never its message. */
function outcomeOf(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^[A-Z][A-Z0-9_]*$/.test(code) ? code : 'INTERNAL';
}
