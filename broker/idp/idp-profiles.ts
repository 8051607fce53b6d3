/**
 * What an IdP does around refresh-token rotation, as named presets (TB_IDP_PROFILE). Explicit
 * variables (TB_IDP_REUSE_GRACE_MS, TB_IDP_REFRESH_INTROSPECTION) override the preset. Where a
 * vendor default could not be confirmed, the preset is the safe value (no grace) and the README
 * says that the operator sets it.
 */
export type IdpProfileName = 'keycloak' | 'okta' | 'auth0' | 'hydra' | 'folio' | 'generic';

/** Whether the broker may ask RFC 7662 introspection about a refresh token. */
export type RefreshIntrospection =
  /** Probed on a token the broker just received: used only if a live token comes back active. */
  | 'probe'
  /** Never asked (the IdP has none for refresh tokens, or the operator says so). */
  | 'off';
export const REFRESH_INTROSPECTION_MODES: readonly RefreshIntrospection[] = ['probe', 'off'];

export interface IdpProfile {
  /** Default TB_IDP_REUSE_GRACE_MS: how long a consumed refresh token may be presented again. */
  reuseGraceMs: number;
  /** Whether the IdP offers a reuse grace period at all (a setting on its side). */
  offersReuseGrace: boolean;
  refreshIntrospection: RefreshIntrospection;
  /** true: each rotation invalidates the previous access token (sidecars may see a 401 window). */
  revokesAccessTokenOnRotation: boolean | undefined;
  /** How the family's absolute end is reported, when the IdP has one. */
  absoluteSessionEnd: string | undefined;
}

export const PROFILES: Readonly<Record<IdpProfileName, Readonly<IdpProfile>>> = {
  // Keycloak: SSO Session Max ends every chain; refresh_expires_in counts down to it. Reuse
  // (with "Revoke Refresh Token") detaches the client session. No grace period.
  keycloak: {
    reuseGraceMs: 0,
    offersReuseGrace: false,
    refreshIntrospection: 'probe',
    revokesAccessTokenOnRotation: false,
    absoluteSessionEnd: 'SSO Session Max, reported in refresh_expires_in',
  },
  // Okta: a configurable grace period for token rotation (set on the app; not assumed here).
  okta: {
    reuseGraceMs: 0,
    offersReuseGrace: true,
    refreshIntrospection: 'probe',
    revokesAccessTokenOnRotation: false,
    absoluteSessionEnd: undefined,
  },
  // Auth0: a configurable "reuse interval"; no RFC 7662 introspection of refresh tokens.
  auth0: {
    reuseGraceMs: 0,
    offersReuseGrace: true,
    refreshIntrospection: 'off',
    revokesAccessTokenOnRotation: false,
    absoluteSessionEnd: undefined,
  },
  // Ory Hydra: oauth2.refresh_token_rotation.grace_period, default 0 (off).
  hydra: {
    reuseGraceMs: 0,
    offersReuseGrace: true,
    refreshIntrospection: 'probe',
    revokesAccessTokenOnRotation: undefined,
    absoluteSessionEnd: undefined,
  },
  // FOLIO RTR: no introspection; Eureka (Keycloak) ends chains at its SSO session maximum.
  folio: {
    reuseGraceMs: 0,
    offersReuseGrace: false,
    refreshIntrospection: 'off',
    revokesAccessTokenOnRotation: undefined,
    absoluteSessionEnd: 'Eureka: the Keycloak SSO session maximum (refresh token expiry)',
  },
  // Unknown semantics: no grace unless the operator sets one (they know their IdP).
  generic: {
    reuseGraceMs: 0,
    offersReuseGrace: true,
    refreshIntrospection: 'probe',
    revokesAccessTokenOnRotation: undefined,
    absoluteSessionEnd: undefined,
  },
};

/** Every profile name, in the order above. */
export const IDP_PROFILES = Object.keys(PROFILES) as readonly IdpProfileName[];

/** The one start-up line per IdP: which semantics are in force (no secrets, no URLs' queries). */
export function describeSemantics(idp: {
  profile: IdpProfileName;
  timeoutMs: number;
  answerWaitMs: number;
  reuseGraceMs: number;
  refreshIntrospection: RefreshIntrospection;
}): Record<string, unknown> {
  const preset = PROFILES[idp.profile];
  return {
    profile: idp.profile,
    sendTimeoutMs: idp.timeoutMs,
    answerWaitMs: idp.answerWaitMs,
    reuseGraceMs: idp.reuseGraceMs,
    refreshIntrospection: idp.refreshIntrospection,
    revokesAccessTokenOnRotation:
      preset.revokesAccessTokenOnRotation === undefined
        ? 'unknown'
        : preset.revokesAccessTokenOnRotation,
    absoluteSessionEnd: preset.absoluteSessionEnd ?? 'none known',
    ...(preset.revokesAccessTokenOnRotation !== false
      ? {
          note: 'sidecars may see a 401 window after each rotation if the IdP revokes the old access token',
        }
      : {}),
  };
}
