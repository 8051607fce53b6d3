import type { SessionRef } from './session-record.js';

/**
 * The one place that builds Redis keys. A session's keys carry the hash tag `{tenant:user}` so
 * that every single-session script touches one Redis Cluster slot. Tenant and user are
 * percent-encoded, so `:`, `{` and `}` in ids cannot break the tag or collide.
 */
export class KeySpace {
  constructor(readonly prefix: string) {}

  /** `enc(tenant):enc(user)`: unique, reversible, and free of `{`, `}` and extra `:`. */
  static sessionId(ref: SessionRef): string {
    return `${encodeURIComponent(ref.tenant)}:${encodeURIComponent(ref.user)}`;
  }

  static parseSessionId(id: string): SessionRef {
    const colon = id.indexOf(':');
    if (colon < 0) throw new Error(`malformed session id ${JSON.stringify(id)}`);
    return {
      tenant: decodeURIComponent(id.slice(0, colon)),
      user: decodeURIComponent(id.slice(colon + 1)),
    };
  }

  /** Hash: gen, sealed, used, inflight. */
  session(ref: SessionRef): string {
    return `${this.prefix}session:{${KeySpace.sessionId(ref)}}`;
  }

  /** Redlock resource of a session (on the lock nodes). */
  lock(ref: SessionRef): string {
    return `${this.prefix}lock:{${KeySpace.sessionId(ref)}}`;
  }

  /** Sorted set of session ids scored by when each is due for rotation (epoch ms). */
  get due(): string {
    return `${this.prefix}due`;
  }

  /** Sorted set of every session id (score 0), listed in lexical order. */
  get index(): string {
    return `${this.prefix}index`;
  }

  /**
   * Sorted set of the ids of sessions in REAUTH_REQUIRED (scored by when they entered it), for the
   * gauge. Kept beside the session writes, not in their script: it is not in the session's slot.
   */
  get reauth(): string {
    return `${this.prefix}reauth`;
  }

  /**
   * Sorted set of the ids of ACTIVE sessions without a login to fall back on whose token family
   * ends at a known time (scored by it, epoch ms), for the family-end gauge. Written with the
   * reauth index.
   */
  get familyEnds(): string {
    return `${this.prefix}family-ends`;
  }

  /** Pub/sub channel of SessionEvent messages. */
  get events(): string {
    return `${this.prefix}events`;
  }
}
