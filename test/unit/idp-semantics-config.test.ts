import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../broker/config.js';
import { ConfigError } from '../../broker/errors.js';
import { describeSemantics } from '../../broker/idp/idp-profiles.js';

/**
 * Issue 12: TB_IDP_ANSWER_WAIT_MS, TB_IDP_PROFILE, TB_IDP_REUSE_GRACE_MS and
 * TB_IDP_REFRESH_INTROSPECTION, from variables and from TB_IDPS_FILE entries.
 */
const SECURE = {
  TB_TLS_CERT_FILE: '/tls/tls.crt',
  TB_TLS_KEY_FILE: '/tls/tls.key',
  TB_AUTH_ISSUER: 'https://kubernetes.default.svc.cluster.local',
  TB_POLICY_FILE: '/policy/policy.yaml',
} as const;
const MINIMAL = {
  TB_IDP_TOKEN_ENDPOINT: 'https://idp.example/token',
  TB_IDP_CLIENT_ID: 'token-broker',
  TB_IDP_CLIENT_SECRET: 'client-secret',
  ...SECURE,
} as const;

function configError(env: Record<string, string>): ConfigError {
  try {
    loadConfig(env);
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return error as ConfigError;
  }
  throw new Error(`expected a ConfigError for ${Object.keys(env).join(', ')}`);
}

const dir = mkdtempSync(join(tmpdir(), 'tb-idp-semantics-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('IdP rotation semantics', () => {
  it('defaults: generic profile, 60 s answer wait, no grace, introspection probed', () => {
    const { idp } = loadConfig({ ...MINIMAL });
    expect(idp.profile).toBe('generic');
    expect(idp.timeoutMs).toBe(5_000);
    expect(idp.answerWaitMs).toBe(60_000);
    expect(idp.reuseGraceMs).toBe(0);
    expect(idp.refreshIntrospection).toBe('probe');
  });

  it('profiles preset the semantics; explicit variables override them', () => {
    expect(loadConfig({ ...MINIMAL, TB_IDP_PROFILE: 'auth0' }).idp.refreshIntrospection).toBe(
      'off',
    );
    const okta = loadConfig({
      ...MINIMAL,
      TB_IDP_PROFILE: 'okta',
      TB_IDP_REUSE_GRACE_MS: '30000',
      TB_IDP_REFRESH_INTROSPECTION: 'off',
    }).idp;
    expect(okta.profile).toBe('okta');
    expect(okta.reuseGraceMs).toBe(30_000);
    expect(okta.refreshIntrospection).toBe('off');
    const folio = loadConfig({
      TB_IDP_TYPE: 'folio',
      TB_IDP_FOLIO_URL: 'https://okapi.example',
      ...SECURE,
    }).idp;
    expect(folio.profile).toBe('folio');
    expect(folio.refreshIntrospection).toBe('off');
  });

  it('refuses what would be unsafe or meaningless, naming the setting', () => {
    expect(configError({ ...MINIMAL, TB_IDP_ANSWER_WAIT_MS: '5000' }).message).toBe(
      'TB_IDP_ANSWER_WAIT_MS (5000) must exceed TB_IDP_TIMEOUT_MS (5000): it bounds the whole call once the request is sent',
    );
    expect(configError({ ...MINIMAL, TB_IDP_ANSWER_WAIT_MS: '700000' }).setting).toBe(
      'TB_IDP_ANSWER_WAIT_MS',
    );
    expect(configError({ ...MINIMAL, TB_IDP_PROFILE: 'ping' }).setting).toBe('TB_IDP_PROFILE');
    expect(configError({ ...MINIMAL, TB_IDP_PROFILE: 'folio' }).setting).toBe('TB_IDP_PROFILE');
    // Keycloak has no grace period: a second presentation there is a reuse.
    const keycloakGrace = configError({
      ...MINIMAL,
      TB_IDP_PROFILE: 'keycloak',
      TB_IDP_REUSE_GRACE_MS: '10000',
    });
    expect(keycloakGrace.setting).toBe('TB_IDP_REUSE_GRACE_MS');
    expect(keycloakGrace.message).toContain('offers no reuse grace period');
    expect(configError({ ...MINIMAL, TB_IDP_REFRESH_INTROSPECTION: 'yes' }).setting).toBe(
      'TB_IDP_REFRESH_INTROSPECTION',
    );
    expect(configError({ ...MINIMAL, TB_IDP_REUSE_GRACE_MS: '-1' }).setting).toBe(
      'TB_IDP_REUSE_GRACE_MS',
    );
  });

  it('reads them per entry of TB_IDPS_FILE, with TB_IDP_ANSWER_WAIT_MS as the default', () => {
    const file = join(dir, 'idps.json');
    writeFileSync(
      file,
      JSON.stringify([
        {
          name: 'hydra',
          tokenEndpoint: 'https://hydra.example/oauth2/token',
          clientId: 'c',
          clientSecret: 's',
          profile: 'hydra',
          reuseGraceMs: 15000,
        },
        {
          name: 'kc',
          tokenEndpoint: 'https://kc.example/token',
          clientId: 'c',
          clientSecret: 's',
          profile: 'keycloak',
          answerWaitMs: 20000,
        },
      ]),
    );
    const config = loadConfig({ ...SECURE, TB_IDPS_FILE: file, TB_IDP_ANSWER_WAIT_MS: '45000' });
    const [hydra, kc] = config.idps;
    expect(hydra!.reuseGraceMs).toBe(15_000);
    expect(hydra!.answerWaitMs).toBe(45_000);
    expect(kc!.profile).toBe('keycloak');
    expect(kc!.answerWaitMs).toBe(20_000);
    writeFileSync(
      file,
      JSON.stringify([
        {
          name: 'kc',
          tokenEndpoint: 'https://kc.example/token',
          clientId: 'c',
          clientSecret: 's',
          profile: 'keycloak',
          reuseGraceMs: 5000,
        },
      ]),
    );
    expect(configError({ ...SECURE, TB_IDPS_FILE: file }).setting).toBe(
      'TB_IDPS_FILE[0].reuseGraceMs',
    );
    // Per-IdP settings cannot come from both places.
    expect(
      configError({ ...SECURE, TB_IDPS_FILE: file, TB_IDP_REUSE_GRACE_MS: '1000' }).setting,
    ).toBe('TB_IDP_REUSE_GRACE_MS');
  });

  it('the start-up line names the semantics in force and no secret', () => {
    const { idp } = loadConfig({ ...MINIMAL, TB_IDP_PROFILE: 'keycloak' });
    const line = describeSemantics(idp);
    expect(line).toMatchObject({
      profile: 'keycloak',
      sendTimeoutMs: 5_000,
      answerWaitMs: 60_000,
      reuseGraceMs: 0,
      refreshIntrospection: 'probe',
      revokesAccessTokenOnRotation: false,
    });
    expect(String(line.absoluteSessionEnd)).toContain('refresh_expires_in');
    expect(JSON.stringify(line)).not.toContain('client-secret');
    expect(describeSemantics(loadConfig({ ...MINIMAL }).idp).note).toContain('401');
  });
});
