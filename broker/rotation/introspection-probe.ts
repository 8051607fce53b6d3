import type { Logger } from 'pino';
import type { BrokerMetrics } from '../broker-metrics.js';
import type { IdpAdapter, IdpContext } from '../idp/idp-adapter.js';
import type { RefreshIntrospection } from '../idp/idp-profiles.js';
import { errorText } from '../redaction.js';

/**
 * Whether an IdP's introspection can be trusted about refresh tokens, per IdP and per process:
 * - `unprobed`: not known yet. An `active: true` answer is trusted (an IdP that cannot introspect
 *   refresh tokens says false, never true), an `active: false` is not: it ends no session.
 * - `usable`: a token the broker had just received came back active. Both answers are trusted.
 * - `unusable`: such a live token came back inactive (an IdP that introspects access tokens
 *   only). Never asked again in this process; an error log and a gauge say so.
 * - `off`: TB_IDP_REFRESH_INTROSPECTION=off, or the IdP has no introspection endpoint.
 */
export type IntrospectionState = 'unprobed' | 'usable' | 'unusable' | 'off';

export class IntrospectionProbes {
  private readonly states = new Map<string, IntrospectionState>();
  private readonly probing = new Set<string>();
  /** After a failed probe, none before this time (epoch ms): a probe holds a rotation's lock. */
  private readonly notBefore = new Map<string, number>();

  constructor(
    private readonly modeOf: (idp: string) => RefreshIntrospection,
    private readonly metrics: BrokerMetrics,
    private readonly log: Logger,
    private readonly clock: () => number = Date.now,
    private readonly retryMs = 10_000,
  ) {}

  state(idp: IdpAdapter): IntrospectionState {
    if (!idp.isActive || this.modeOf(idp.name) === 'off') return 'off';
    return this.states.get(idp.name) ?? 'unprobed';
  }

  /**
   * Asks the IdP about `liveToken`, a refresh token it has just issued, while the caller still
   * holds the session's lock (so nobody can have presented it since). Once per IdP and process;
   * a failed probe (network, non-200) is tried again at a rotation 10 s later or more. The call
   * is bounded by the lock and by `timeoutMs`.
   */
  async probe(
    idp: IdpAdapter,
    liveToken: string,
    lock: AbortSignal,
    timeoutMs: number,
    context: IdpContext,
  ): Promise<void> {
    if (this.state(idp) !== 'unprobed' || this.probing.has(idp.name) || lock.aborted) return;
    if ((this.notBefore.get(idp.name) ?? 0) > this.clock()) return;
    this.probing.add(idp.name);
    try {
      const signal = AbortSignal.any([lock, AbortSignal.timeout(timeoutMs)]);
      const active = await idp.isActive!(liveToken, signal, context);
      if (active === undefined) {
        this.states.set(idp.name, 'off');
        this.log.info(
          { idp: idp.name },
          'IdP has no introspection endpoint: lost answers are resolved by the reuse grace period or one re-presentation',
        );
      } else if (active) {
        this.states.set(idp.name, 'usable');
        this.metrics.introspectionUnusable(idp.name, false);
        this.log.info(
          { idp: idp.name },
          'IdP introspection knows refresh tokens (a live one came back active): used to resolve lost answers',
        );
      } else {
        this.states.set(idp.name, 'unusable');
        this.metrics.introspectionUnusable(idp.name, true);
        this.log.error(
          { idp: idp.name },
          'IdP introspection answered active:false for a refresh token it had just issued: it cannot tell about refresh tokens, so it is not used (set TB_IDP_REFRESH_INTROSPECTION=off to skip this probe)',
        );
      }
    } catch (err) {
      this.notBefore.set(idp.name, this.clock() + this.retryMs);
      this.log.warn(
        { idp: idp.name, err: errorText(err) },
        'could not probe the IdP introspection; will probe again at a rotation in 10 s or later',
      );
    } finally {
      this.probing.delete(idp.name);
    }
  }
}
