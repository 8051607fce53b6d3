import {
  ReauthRequiredError,
  SessionNotFoundError,
  SessionRevokedError,
  TokenUnavailableError,
  WaitTimeoutError,
  type SidecarError,
} from './errors.js';
import type { TokenStore, UserEntry } from './token-store.js';

export type ReadDecision =
  | { kind: 'serve' }
  | { kind: 'wait'; refresh: boolean; fetch?: boolean }
  | { kind: 'fail'; error: SidecarError };

const SERVE: ReadDecision = { kind: 'serve' };
const WAIT: ReadDecision = { kind: 'wait', refresh: false };
const WAIT_AND_REFRESH: ReadDecision = { kind: 'wait', refresh: true };
/** The held token is too close to expiry: ask another replica (GetToken) while waiting. */
const WAIT_AND_FETCH: ReadDecision = { kind: 'wait', refresh: false, fetch: true };

/**
 * What a token read answers now. Terminal session states answer at once; otherwise the read
 * waits (until `final`) for a fresh token of at least `minGeneration`. `refresh` asks the caller
 * to have the broker rotate: the module reported the held generation as rejected.
 */
export function decideRead(
  store: TokenStore,
  entry: UserEntry,
  minGeneration: number,
  final: boolean,
  waitedMs: number,
  now?: number,
): ReadDecision {
  const state = entry.state;
  if (state?.status === 'REAUTH_REQUIRED')
    return { kind: 'fail', error: new ReauthRequiredError() };
  if (state?.status === 'REVOKED') return { kind: 'fail', error: new SessionRevokedError() };
  const generation = state?.generation ?? 0;
  if (generation < minGeneration) {
    if (!final) return state ? WAIT_AND_REFRESH : WAIT;
    if (!state) return { kind: 'fail', error: unavailable(store, entry) };
    return { kind: 'fail', error: new WaitTimeoutError(minGeneration, generation, waitedMs) };
  }
  if (store.isFresh(entry, now)) return SERVE;
  if (!final) return state?.status === 'ACTIVE' && state.accessToken !== '' ? WAIT_AND_FETCH : WAIT;
  return { kind: 'fail', error: unavailable(store, entry) };
}

function seconds(ms: number): string {
  return `${Math.round(ms / 100) / 10} s`;
}

function unavailable(store: TokenStore, entry: UserEntry): SidecarError {
  const state = entry.state;
  if (!state) {
    if (entry.notFound) return new SessionNotFoundError(entry.tenant, entry.user);
    return new TokenUnavailableError(
      'no token for this user yet: the broker has not answered (is it reachable?)',
    );
  }
  if (state.status === 'IDLE')
    return new TokenUnavailableError('the session was idle and is being reactivated; retry');
  if (state.accessToken === '')
    return new TokenUnavailableError(
      `the session holds no usable access token yet${state.errorCode ? ` (last refresh failed: ${state.errorCode})` : ''}; retry`,
    );
  const skew = store.skewFor(state);
  const which = skew.shrunk
    ? `the safety skew of ${seconds(skew.skewMs)} (a quarter of the token's ${seconds(skew.lifetimeMs ?? 0)} lifetime, smaller than TB_SIDECAR_SAFETY_SKEW_MS ${seconds(skew.configuredMs)})`
    : `the safety skew of ${seconds(skew.skewMs)} (TB_SIDECAR_SAFETY_SKEW_MS)`;
  return new TokenUnavailableError(
    `the newest access token (generation ${state.generation}) expires within ${which} and no newer one has arrived from any broker replica (brokers or identity provider unreachable?); retry`,
  );
}
