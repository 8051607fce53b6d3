import type { Logger } from 'pino';
import { PermissionDeniedError, UnauthenticatedError } from '../errors.js';
import type { SessionRef } from '../store/session-record.js';
import type { AccessPolicy, Verb } from './access-policy.js';
import { AuditLog, type AuditCaller, type AuditPeer } from './audit-log.js';
import type { PolicyFile } from './policy-file.js';
import type { CallerIdentity, ServiceAccountVerifier } from './service-account-verifier.js';

/**
 * Who may do what (promise 8): every call but health names its caller with a projected
 * ServiceAccount token, and a policy over (namespace/serviceaccount, verb, tenant, user) allows
 * it or not. Denials, unauthenticated calls, enrollments, revocations and first reads are audited.
 */
export class AccessControl {
  readonly audit: AuditLog;

  constructor(
    private readonly verifier: ServiceAccountVerifier,
    private readonly policyFile: PolicyFile,
    log: Logger,
    clock: () => number = Date.now,
  ) {
    this.audit = new AuditLog(log, clock);
  }

  /** The caller of a token verified before, synchronously; undefined: use authenticate(). */
  cachedCaller(header: string | undefined): CallerIdentity | undefined {
    return this.verifier.verifyCached(header);
  }

  /** The verified caller of a call whose `authorization` metadata is `header`. */
  async authenticate(header: string | undefined, peer: AuditPeer): Promise<CallerIdentity> {
    try {
      return await this.verifier.verify(header);
    } catch (err) {
      if (err instanceof UnauthenticatedError) this.audit.unauthenticated(err.reason, peer);
      throw err;
    }
  }

  /** The rule allowing `verb` on `session`; throws PermissionDeniedError (audited) otherwise. */
  authorize(caller: CallerIdentity, verb: Verb, session: SessionRef): string {
    const rule = this.policy().allowingRule(caller, verb, session);
    if (rule !== undefined) return rule;
    this.audit.denied(auditCaller(caller), verb, session);
    throw new PermissionDeniedError(
      `${caller.subject} may not ${verb} sessions of tenant ${JSON.stringify(session.tenant)} (no access policy rule allows it)`,
    );
  }

  /** ListSessions: the caller must be allowed to list something in `tenant` ('' = any tenant). */
  authorizeList(caller: CallerIdentity, tenant: string): void {
    if (this.policy().mayListAny(caller, tenant || undefined)) return;
    this.audit.denied(auditCaller(caller), 'list', tenant ? { tenant } : {});
    throw new PermissionDeniedError(
      `${caller.subject} may not list sessions${tenant ? ` of tenant ${JSON.stringify(tenant)}` : ''} (no access policy rule allows it)`,
    );
  }

  mayList(caller: CallerIdentity, session: SessionRef): boolean {
    return this.policy().allows(caller, 'list', session);
  }

  policy(): AccessPolicy {
    return this.policyFile.current();
  }

  /** Watches the policy file and refreshes keys until `signal` aborts. */
  async run(signal: AbortSignal): Promise<void> {
    await this.policyFile.run(signal);
  }

  close(): void {
    this.verifier.close();
  }
}

export function auditCaller(caller: CallerIdentity): AuditCaller {
  return {
    namespace: caller.namespace,
    serviceAccount: caller.serviceAccount,
    pod: caller.podName,
    podUid: caller.podUid,
  };
}
