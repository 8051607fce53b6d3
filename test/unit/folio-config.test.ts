import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { loadConfig } from '../../broker/config.js';
import { ConfigError } from '../../broker/errors.js';
import { FolioAdapter } from '../../broker/idp/folio-adapter.js';
import { createIdpAdapter } from '../../broker/idp/idp-factory.js';
import { OAuth2Adapter } from '../../broker/idp/oauth2-adapter.js';

/** TLS and caller authentication, as every broker needs (the files are read at start, not here). */
const SECURE = {
  TB_TLS_CERT_FILE: '/tls/tls.crt',
  TB_TLS_KEY_FILE: '/tls/tls.key',
  TB_AUTH_ISSUER: 'https://kubernetes.default.svc.cluster.local',
  TB_POLICY_FILE: '/policy/policy.yaml',
} as const;
const FOLIO = {
  TB_IDP_TYPE: 'folio',
  TB_IDP_FOLIO_URL: 'https://okapi.example.org',
  ...SECURE,
} as const;
const OAUTH2 = {
  ...SECURE,
  TB_IDP_TOKEN_ENDPOINT: 'https://idp.example/token',
  TB_IDP_CLIENT_ID: 'token-broker',
  TB_IDP_CLIENT_SECRET: 'client-secret',
} as const;

const dir = mkdtempSync(join(tmpdir(), 'tb-folio-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function configError(env: Record<string, string>): ConfigError {
  try {
    loadConfig(env);
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return error as ConfigError;
  }
  throw new Error(`expected a ConfigError for ${Object.keys(env).join(', ')}`);
}

let files = 0;
function idpsFile(content: unknown): string {
  const path = join(dir, `idps-${++files}.json`);
  writeFileSync(path, typeof content === 'string' ? content : JSON.stringify(content));
  return path;
}

describe('IdP type configuration', () => {
  it('keeps the single OAuth2 IdP of the TB_IDP_* variables as the default type', () => {
    const config = loadConfig({ ...OAUTH2 });
    expect(config.idp.type).toBe('oauth2');
    expect(config.idps.map((idp) => idp.name)).toEqual(['default']);
    expect(config.idp.exchangeTokenType).toBeUndefined();
    expect(config.secretsDir).toBeUndefined();
    expect(createIdpAdapter(config.idp)).toBeInstanceOf(OAuth2Adapter);
  });

  it('configures a FOLIO gateway with TB_IDP_TYPE=folio and TB_IDP_FOLIO_URL alone', () => {
    const config = loadConfig({ ...FOLIO, TB_IDP_NAME: 'folio', TB_IDP_TIMEOUT_MS: '3000' });
    expect(config.idp).toMatchObject({
      name: 'folio',
      type: 'folio',
      folioUrl: FOLIO.TB_IDP_FOLIO_URL,
      timeoutMs: 3_000,
      clientId: '',
    });
    const adapter = createIdpAdapter(config.idp);
    expect(adapter).toBeInstanceOf(FolioAdapter);
    expect(adapter.name).toBe('folio');
  });

  const bad: [string, Record<string, string>][] = [
    ['TB_IDP_TYPE', { ...OAUTH2, TB_IDP_TYPE: 'keycloak' }],
    ['TB_IDP_FOLIO_URL', { TB_IDP_TYPE: 'folio' }],
    ['TB_IDP_FOLIO_URL', { ...FOLIO, TB_IDP_FOLIO_URL: 'okapi:9130' }],
    ['TB_IDP_FOLIO_URL', { ...OAUTH2, TB_IDP_FOLIO_URL: 'https://okapi.example.org' }],
    ['TB_IDP_CLIENT_ID', { ...FOLIO, TB_IDP_CLIENT_ID: 'token-broker' }],
    ['TB_IDP_TOKEN_ENDPOINT', { ...FOLIO, TB_IDP_TOKEN_ENDPOINT: 'https://idp.example/token' }],
    ['TB_IDP_TIMEOUT_MS', { ...FOLIO, TB_IDP_TIMEOUT_MS: '20000' }],
    ['TB_SECRETS_DIR', { ...FOLIO, TB_SECRETS_DIR: join(dir, 'no-such-dir') }],
  ];
  it.each(bad)('rejects a bad %s, naming it', (setting, env) => {
    const error = configError(env);
    expect(error.setting).toBe(setting);
    expect(error.message.startsWith(`${setting} `)).toBe(true);
  });

  it('accepts an existing TB_SECRETS_DIR', () => {
    expect(loadConfig({ ...FOLIO, TB_SECRETS_DIR: dir }).secretsDir).toBe(dir);
  });
});

describe('TB_IDPS_FILE', () => {
  const secretFile = join(dir, 'client-secret');
  writeFileSync(secretFile, 'from-file\n');
  const two = [
    {
      name: 'keycloak',
      issuer: 'https://kc.example/realms/diku',
      clientId: 'tb',
      clientSecretFile: secretFile,
    },
    { name: 'folio-diku', type: 'folio', folioUrl: 'https://okapi.example.org', timeoutMs: 2000 },
  ];

  it('configures several IdPs, the first the default unless TB_IDP_NAME picks one', () => {
    const config = loadConfig({ ...SECURE, TB_IDPS_FILE: idpsFile(two) });
    expect(config.idps.map((idp) => [idp.name, idp.type])).toEqual([
      ['keycloak', 'oauth2'],
      ['folio-diku', 'folio'],
    ]);
    expect(config.idp.name).toBe('keycloak');
    expect(config.idps[0]!.clientSecret === 'from-file').toBe(true);
    expect(config.idps[0]!.timeoutMs).toBe(5_000);
    expect(config.idps[1]!.timeoutMs).toBe(2_000);

    const picked = loadConfig({
      ...SECURE,
      TB_IDPS_FILE: idpsFile(two),
      TB_IDP_NAME: 'folio-diku',
    });
    expect(picked.idp.name).toBe('folio-diku');
    expect(picked.idps.map((idp) => idp.name)).toEqual(['folio-diku', 'keycloak']);
  });

  const bad: [string, () => Record<string, string>][] = [
    ['TB_IDPS_FILE', () => ({ TB_IDPS_FILE: join(dir, 'missing.json') })],
    ['TB_IDPS_FILE', () => ({ TB_IDPS_FILE: idpsFile([]) })],
    ['TB_IDPS_FILE[0]', () => ({ TB_IDPS_FILE: idpsFile(['folio']) })],
    ['TB_IDPS_FILE[0].name', () => ({ TB_IDPS_FILE: idpsFile([{ type: 'folio' }]) })],
    [
      'TB_IDPS_FILE[1].folioUrl',
      () => ({ TB_IDPS_FILE: idpsFile([two[0], { name: 'f', type: 'folio' }]) }),
    ],
    ['TB_IDPS_FILE[1].name', () => ({ TB_IDPS_FILE: idpsFile([two[1], two[1]]) })],
    [
      'TB_IDPS_FILE[0].clientSecret',
      () => ({
        TB_IDPS_FILE: idpsFile([{ name: 'k', issuer: 'https://kc.example', clientId: 'tb' }]),
      }),
    ],
    ['TB_IDPS_FILE[0].colour', () => ({ TB_IDPS_FILE: idpsFile([{ ...two[1], colour: 'blue' }]) })],
    [
      'TB_IDPS_FILE[0].timeoutMs',
      () => ({ TB_IDPS_FILE: idpsFile([{ ...two[1], timeoutMs: 60_000 }]) }),
    ],
    ['TB_IDP_ISSUER', () => ({ TB_IDPS_FILE: idpsFile(two), TB_IDP_ISSUER: 'https://kc.example' })],
    ['TB_IDP_NAME', () => ({ TB_IDPS_FILE: idpsFile(two), TB_IDP_NAME: 'nope' })],
  ];
  it.each(bad)('rejects a bad %s, naming it', (setting, env) => {
    const error = configError(env());
    expect(error.setting).toBe(setting);
    expect(error.message.startsWith(`${setting} `)).toBe(true);
  });

  it('never echoes the file content when it is not JSON (it may hold a client secret)', () => {
    const error = configError({
      TB_IDPS_FILE: idpsFile('[{"name":"k","clientSecret":"Hunter2SecretValue",}]'),
    });
    expect(error.message).toBe('TB_IDPS_FILE is not valid JSON');
  });
});
