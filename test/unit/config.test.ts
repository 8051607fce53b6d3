import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { BROKER_VARIABLES, loadConfig } from '../../broker/config.js';
import { ConfigError } from '../../broker/errors.js';

/** What every broker needs: TLS and caller authentication (files are read at start, not here). */
const SECURE = {
  TB_TLS_CERT_FILE: '/var/run/secrets/token-broker-tls/tls.crt',
  TB_TLS_KEY_FILE: '/var/run/secrets/token-broker-tls/tls.key',
  TB_AUTH_ISSUER: 'https://kubernetes.default.svc.cluster.local',
  TB_POLICY_FILE: '/etc/token-broker/policy/policy.yaml',
} as const;

/** The least an embedded-mode broker needs. */
const MINIMAL = {
  TB_IDP_TOKEN_ENDPOINT: 'https://idp.example/token',
  TB_IDP_CLIENT_ID: 'token-broker',
  TB_IDP_CLIENT_SECRET: 'client-secret',
  ...SECURE,
} as const;

const SEALING = 'k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=';

function configError(env: Record<string, string>): ConfigError {
  try {
    loadConfig(env);
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return error as ConfigError;
  }
  throw new Error(`expected a ConfigError for ${Object.keys(env).join(', ')}`);
}

const dir = mkdtempSync(join(tmpdir(), 'tb-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('loadConfig', () => {
  it('accepts a minimal environment: embedded mode with documented defaults', () => {
    const config = loadConfig({ ...MINIMAL });
    expect(config.redisUrl).toBeUndefined();
    expect(config.redlockUrls).toEqual([]);
    expect(config.idp.tokenEndpoint).toBe(MINIMAL.TB_IDP_TOKEN_ENDPOINT);
    expect(config.idp.clientId).toBe('token-broker');
    expect(config.idp.authMethod).toBe('client_secret_basic');
    expect(config.idp.timeoutMs).toBe(5_000);
    expect(config.lock.ttlMs).toBe(15_000);
    expect(config.lock.extendBeforeMs).toBe(5_000);
    expect(config.rotation.ratio).toBe(0.75);
    expect(config.worker.claimLeaseMs).toBe(30_000);
    expect(config.sessionIdleTimeoutMs).toBe(3_600_000);
    expect(config.keyPrefix).toBe('tb:');
  });

  it('uses the state store as the only lock node when TB_REDLOCK_URLS is unset', () => {
    const config = loadConfig({
      ...MINIMAL,
      TB_REDIS_URL: 'redis://127.0.0.1:6379',
      TB_SEALING_KEYS: SEALING,
    });
    expect(config.redlockUrls).toEqual(['redis://127.0.0.1:6379']);
    expect(config.sealingKeysSetting).toBe('TB_SEALING_KEYS');
  });

  it('reads the sealing keys and the client secret from files', () => {
    const keys = join(dir, 'keys');
    const secret = join(dir, 'secret');
    writeFileSync(keys, SEALING);
    writeFileSync(secret, 'from-file\n');
    const config = loadConfig({
      TB_IDP_TOKEN_ENDPOINT: MINIMAL.TB_IDP_TOKEN_ENDPOINT,
      TB_IDP_CLIENT_ID: 'token-broker',
      TB_IDP_CLIENT_SECRET_FILE: secret,
      TB_REDIS_URL: 'rediss://cache.example:6380',
      TB_SEALING_KEYS_FILE: keys,
      ...SECURE,
    });
    expect(config.sealingKeysText).toBe(SEALING);
    expect(config.sealingKeysSetting).toBe('TB_SEALING_KEYS_FILE');
    expect(config.idp.clientSecret === 'from-file').toBe(true);
  });

  it('puts the password of TB_REDIS_PASSWORD_FILE into the state and every lock URL', () => {
    const file = join(dir, 'redis-password');
    // Characters a URL must escape, and the newline `echo` leaves.
    const password = 'p@ss:w/rd#1%';
    writeFileSync(file, `${password}\n`);
    const config = loadConfig({
      ...MINIMAL,
      TB_REDIS_URL: 'redis://state.example:6379',
      TB_REDLOCK_URLS: 'redis://a.example:6379,rediss://b.example:6380,redis://app@c.example:6379',
      TB_REDIS_PASSWORD_FILE: file,
      TB_SEALING_KEYS: SEALING,
    });
    const urls = [config.redisUrl!, ...config.redlockUrls].map((u) => new URL(u));
    expect(urls.map((u) => u.host)).toEqual([
      'state.example:6379',
      'a.example:6379',
      'b.example:6380',
      'c.example:6379',
    ]);
    for (const url of urls) expect(decodeURIComponent(url.password) === password).toBe(true);
    expect(urls.map((u) => u.username)).toEqual(['', '', '', 'app']);
    // Without TB_REDLOCK_URLS the state store is the lock node, with the password too.
    const single = loadConfig({
      ...MINIMAL,
      TB_REDIS_URL: 'redis://state.example:6379',
      TB_REDIS_PASSWORD_FILE: file,
      TB_SEALING_KEYS: SEALING,
    });
    expect(single.redlockUrls).toEqual([single.redisUrl]);
    expect(decodeURIComponent(new URL(single.redisUrl!).password) === password).toBe(true);
  });

  it('refuses a TB_REDIS_PASSWORD_FILE it cannot use, naming the variable, never the password', () => {
    const password = 'Secret-Redis-Password-42';
    const good = join(dir, 'redis-password-good');
    writeFileSync(good, password);
    const empty = join(dir, 'redis-password-empty');
    writeFileSync(empty, '\n');
    const twoLines = join(dir, 'redis-password-two-lines');
    writeFileSync(twoLines, `${password}\nsecond\n`);
    const redis = { TB_REDIS_URL: 'redis://state.example:6379', TB_SEALING_KEYS: SEALING };
    const cases: [string, Record<string, string>][] = [
      ['TB_REDIS_PASSWORD_FILE', { TB_REDIS_PASSWORD_FILE: good }],
      ['TB_REDIS_PASSWORD_FILE', { ...redis, TB_REDIS_PASSWORD_FILE: join(dir, 'missing') }],
      ['TB_REDIS_PASSWORD_FILE', { ...redis, TB_REDIS_PASSWORD_FILE: empty }],
      ['TB_REDIS_PASSWORD_FILE', { ...redis, TB_REDIS_PASSWORD_FILE: twoLines }],
      [
        'TB_REDIS_URL',
        {
          ...redis,
          TB_REDIS_URL: 'redis://:other@state.example:6379',
          TB_REDIS_PASSWORD_FILE: good,
        },
      ],
      [
        'TB_REDLOCK_URLS[2]',
        {
          ...redis,
          TB_REDLOCK_URLS: 'redis://a:1,redis://b:1,redis://:other@c:1',
          TB_REDIS_PASSWORD_FILE: good,
        },
      ],
    ];
    for (const [setting, env] of cases) {
      const error = configError({ ...MINIMAL, ...env });
      expect(error.message.startsWith(`${setting} `), error.message).toBe(true);
      expect(error.message.includes(password)).toBe(false);
      expect(error.message.includes('second')).toBe(false);
    }
  });

  // Each case: the variable the message must start with, and the environment on top of MINIMAL.
  const bad: [string, Record<string, string>][] = [
    ['TB_LOCK_TTL_MS', { TB_LOCK_TTL_MS: 'fifteen' }],
    ['TB_LOCK_TTL_MS', { TB_LOCK_TTL_MS: '-5' }],
    ['TB_LOCK_TTL_MS', { TB_LOCK_TTL_MS: '500' }],
    ['TB_REFRESH_RATIO', { TB_REFRESH_RATIO: 'most' }],
    ['TB_REDIS_URL', { TB_REDIS_URL: 'http://cache.example:6379', TB_SEALING_KEYS: SEALING }],
    ['TB_REDIS_URL', { TB_REDIS_URL: 'cache.example:6379', TB_SEALING_KEYS: SEALING }],
    ['TB_SEALING_KEYS', { TB_REDIS_URL: 'redis://cache.example:6379' }],
    [
      'TB_SEALING_KEYS_FILE',
      {
        TB_REDIS_URL: 'redis://cache.example:6379',
        TB_SEALING_KEYS: SEALING,
        TB_SEALING_KEYS_FILE: '/nonexistent',
      },
    ],
    ['TB_SEALING_KEYS_FILE', { TB_SEALING_KEYS_FILE: join(dir, 'missing') }],
    ['TB_REDLOCK_URLS', { TB_REDLOCK_URLS: 'redis://a:1,redis://b:1,redis://c:1' }],
    [
      'TB_REDLOCK_URLS[1]',
      {
        TB_REDIS_URL: 'redis://cache.example:6379',
        TB_SEALING_KEYS: SEALING,
        TB_REDLOCK_URLS: 'redis://a:1,https://b:1,redis://c:1',
      },
    ],
    ['TB_IDP_TIMEOUT_MS', { TB_LOCK_TTL_MS: '3000', TB_IDP_TIMEOUT_MS: '5000' }],
    ['TB_IDP_TIMEOUT_MS', { TB_IDP_TIMEOUT_MS: '9500' }],
    ['TB_IDP_TIMEOUT_MS', { TB_IDP_TIMEOUT_MS: '50' }],
    ['TB_LOCK_EXTEND_BEFORE_MS', { TB_LOCK_TTL_MS: '2000', TB_LOCK_EXTEND_BEFORE_MS: '1950' }],
    ['TB_CLAIM_LEASE_MS', { TB_CLAIM_LEASE_MS: '15000' }],
    ['TB_IDP_CLIENT_ID', { TB_IDP_CLIENT_ID: '' }],
    ['TB_IDP_CLIENT_ID', { TB_IDP_CLIENT_ID: '   ' }],
    ['TB_IDP_CLIENT_SECRET', { TB_IDP_CLIENT_SECRET: '' }],
    ['TB_IDP_CLIENT_SECRET_FILE', { TB_IDP_CLIENT_SECRET_FILE: join(dir, 'missing') }],
    ['TB_IDP_AUTH_METHOD', { TB_IDP_AUTH_METHOD: 'private_key_jwt_please' }],
    ['TB_IDP_TOKEN_ENDPOINT', { TB_IDP_TOKEN_ENDPOINT: '' }],
    ['TB_IDP_TOKEN_ENDPOINT', { TB_IDP_TOKEN_ENDPOINT: 'ftp://idp.example/token' }],
    ['TB_IDP_ISSUER', { TB_IDP_ISSUER: 'idp.example' }],
    ['TB_IDP_REVOCATION_ENDPOINT', { TB_IDP_REVOCATION_ENDPOINT: 'redis://idp.example' }],
    ['TB_LOG_LEVEL', { TB_LOG_LEVEL: 'loud' }],
    ['TB_SESSION_IDLE_TIMEOUT_MS', { TB_SESSION_IDLE_TIMEOUT_MS: '10' }],
    ['TB_ROTATION_CONCURRENCY', { TB_ROTATION_CONCURRENCY: '0' }],
  ];
  it.each(bad)('rejects a bad %s with a message that starts with its name', (setting, extra) => {
    const error = configError({ ...MINIMAL, ...extra });
    expect(error.setting).toBe(setting);
    expect(error.message.startsWith(`${setting} `)).toBe(true);
    expect(error.code).toBe('CONFIG_INVALID');
  });

  // Every IdP check happens here, once (the adapters take already-valid settings).
  it.each<[string, Record<string, string>, string]>([
    [
      'ftp token endpoint',
      { TB_IDP_TOKEN_ENDPOINT: 'ftp://idp.example/token' },
      'TB_IDP_TOKEN_ENDPOINT',
    ],
    ['relative token endpoint', { TB_IDP_TOKEN_ENDPOINT: '/token' }, 'TB_IDP_TOKEN_ENDPOINT'],
    ['neither endpoint nor issuer', { TB_IDP_TOKEN_ENDPOINT: '' }, 'TB_IDP_TOKEN_ENDPOINT'],
    ['bad issuer', { TB_IDP_TOKEN_ENDPOINT: '', TB_IDP_ISSUER: 'idp.example' }, 'TB_IDP_ISSUER'],
    [
      'bad revocation endpoint',
      { TB_IDP_REVOCATION_ENDPOINT: 'nope' },
      'TB_IDP_REVOCATION_ENDPOINT',
    ],
    [
      'bad introspection endpoint',
      { TB_IDP_INTROSPECTION_ENDPOINT: 'ftp://x/i' },
      'TB_IDP_INTROSPECTION_ENDPOINT',
    ],
    ['empty client id', { TB_IDP_CLIENT_ID: '' }, 'TB_IDP_CLIENT_ID'],
    ['unknown auth method', { TB_IDP_AUTH_METHOD: 'private_key_jwt' }, 'TB_IDP_AUTH_METHOD'],
    ['basic without secret', { TB_IDP_CLIENT_SECRET: '' }, 'TB_IDP_CLIENT_SECRET'],
    [
      'post without secret',
      { TB_IDP_AUTH_METHOD: 'client_secret_post', TB_IDP_CLIENT_SECRET: '' },
      'TB_IDP_CLIENT_SECRET',
    ],
    ['none with a secret', { TB_IDP_AUTH_METHOD: 'none' }, 'TB_IDP_CLIENT_SECRET'],
    ['zero timeout', { TB_IDP_TIMEOUT_MS: '0' }, 'TB_IDP_TIMEOUT_MS'],
    ['fractional timeout', { TB_IDP_TIMEOUT_MS: '1.5' }, 'TB_IDP_TIMEOUT_MS'],
    [
      'folio URL that is not http(s)',
      {
        TB_IDP_TYPE: 'folio',
        TB_IDP_TOKEN_ENDPOINT: '',
        TB_IDP_CLIENT_ID: '',
        TB_IDP_CLIENT_SECRET: '',
        TB_IDP_FOLIO_URL: 'okapi:9130',
      },
      'TB_IDP_FOLIO_URL',
    ],
  ])('rejects an IdP with %s, naming the variable', (_what, change, setting) => {
    const error = configError({ ...MINIMAL, ...change });
    expect(error.setting).toBe(setting);
    expect(error.message.startsWith(`${setting} `)).toBe(true);
  });

  it('names the exact problem of an IdP setting, and the TB_IDPS_FILE entry and field', () => {
    expect(configError({ ...MINIMAL, TB_IDP_TOKEN_ENDPOINT: 'nope' }).message).toBe(
      'TB_IDP_TOKEN_ENDPOINT must be a URL, got "nope"',
    );
    expect(configError({ ...MINIMAL, TB_IDP_AUTH_METHOD: 'none' }).message).toBe(
      'TB_IDP_CLIENT_SECRET must not be set with TB_IDP_AUTH_METHOD=none (a public client sends no secret)',
    );
    const file = join(dir, 'idps-none-with-secret.json');
    writeFileSync(
      file,
      JSON.stringify([
        { name: 'a', tokenEndpoint: 'https://a.example/token', clientId: 'c', clientSecret: 's' },
        {
          name: 'b',
          tokenEndpoint: 'https://b.example/token',
          clientId: 'c',
          clientSecret: 's',
          authMethod: 'none',
        },
      ]),
    );
    expect(configError({ TB_IDPS_FILE: file }).setting).toBe('TB_IDPS_FILE[1].clientSecret');
    writeFileSync(
      file,
      JSON.stringify([
        { name: '', tokenEndpoint: 'https://a.example/token', clientId: 'c', clientSecret: 's' },
      ]),
    );
    expect(configError({ TB_IDPS_FILE: file }).setting).toBe('TB_IDPS_FILE[0].name');
  });

  it('requires TLS in Redis mode and caller authentication everywhere, unless turned off explicitly', () => {
    const redis = { TB_REDIS_URL: 'redis://127.0.0.1:6379', TB_SEALING_KEYS: SEALING };
    const { TB_TLS_CERT_FILE: _c, TB_TLS_KEY_FILE: _k, ...noTls } = MINIMAL;
    expect(configError({ ...noTls, ...redis }).setting).toBe('TB_TLS_CERT_FILE');
    expect(loadConfig({ ...noTls }).tls).toBeUndefined(); // embedded mode may stay plaintext
    expect(loadConfig({ ...noTls, ...redis, TB_TLS: 'off' }).tls).toBeUndefined();
    expect(loadConfig({ ...MINIMAL, ...redis }).tls).toEqual({
      certFile: SECURE.TB_TLS_CERT_FILE,
      keyFile: SECURE.TB_TLS_KEY_FILE,
      clientCaFile: undefined,
    });
    expect(configError({ ...MINIMAL, TB_TLS: 'off' }).setting).toBe('TB_TLS_CERT_FILE');
    expect(configError({ ...noTls, TB_TLS_CERT_FILE: '/c' }).setting).toBe('TB_TLS_KEY_FILE');
    expect(configError({ ...MINIMAL, TB_TLS: 'sometimes' }).message).toMatch(
      /^TB_TLS must be on or off/,
    );

    const { TB_AUTH_ISSUER: _i, TB_POLICY_FILE: _p, ...noAuth } = MINIMAL;
    expect(configError({ ...noAuth }).setting).toBe('TB_AUTH_ISSUER');
    expect(loadConfig({ ...noAuth, TB_AUTH: 'off' }).auth).toBeUndefined();
    expect(configError({ ...noAuth, TB_AUTH_ISSUER: SECURE.TB_AUTH_ISSUER }).setting).toBe(
      'TB_POLICY_FILE',
    );
    expect(loadConfig({ ...MINIMAL }).auth).toEqual({
      issuer: SECURE.TB_AUTH_ISSUER,
      audience: 'token-broker',
      discovery: true,
      jwksFile: undefined,
      issuerCaFile: undefined,
      issuerTokenFile: undefined,
      policyFile: SECURE.TB_POLICY_FILE,
    });
    expect(
      loadConfig({ ...MINIMAL, TB_AUTH_JWKS_FILE: '/jwks.json', TB_AUTH_AUDIENCE: 'tb' }).auth,
    ).toMatchObject({ discovery: false, jwksFile: '/jwks.json', audience: 'tb' });
    // The verifier takes these settings as they are: every check of them happens here.
    expect(configError({ ...MINIMAL, TB_AUTH_ISSUER: 'not a url' }).message).toMatch(
      /^TB_AUTH_ISSUER must be a URL/,
    );
    expect(
      loadConfig({ ...MINIMAL, TB_AUTH_ISSUER: 'http://issuer.local', TB_AUTH_JWKS_FILE: '/j' })
        .auth?.issuer,
    ).toBe('http://issuer.local'); // never fetched: a JWKS file makes http fine
    expect(configError({ ...MINIMAL, TB_AUTH_ISSUER: 'http://issuer.local' }).setting).toBe(
      'TB_AUTH_ISSUER',
    );
    expect(
      configError({ ...MINIMAL, TB_AUTH_JWKS_FILE: '/jwks.json', TB_AUTH_ISSUER_CA_FILE: '/ca' })
        .setting,
    ).toBe('TB_AUTH_ISSUER_CA_FILE');
  });

  it('requires the client secret only for authentication methods that use one', () => {
    const config = loadConfig({
      ...MINIMAL,
      TB_IDP_CLIENT_SECRET: '',
      TB_IDP_AUTH_METHOD: 'none',
    });
    expect(config.idp.authMethod).toBe('none');
  });

  // Unencoded '/', '@' or spaces in a password make a URL unparseable: exactly when it is echoed.
  const secretUrls = [
    'redis://user:Hunter2Secret@cache.example:notaport',
    'redis://user:Hunter2/Secret@cache.example:6379',
    'redis://user:Hunter2@Secret@cache.example:x',
    'redis://:Hunter2 Secret@cache.example:1:2',
    'redis://user:Hunter2Secret@[::1',
    'https://user:Hunter2Secret@cache.example:6379',
  ];
  it.each(secretUrls)('never echoes the password of a bad URL (%#)', (url) => {
    for (const setting of ['TB_REDIS_URL', 'TB_REDLOCK_URLS'] as const) {
      const env: Record<string, string> = {
        ...MINIMAL,
        TB_REDIS_URL: 'redis://cache.example:6379',
        TB_SEALING_KEYS: SEALING,
        [setting]: url,
      };
      const error = configError(env);
      expect(error.message.startsWith(setting)).toBe(true);
      for (const part of ['Hunter2', 'Secret']) expect(error.message).not.toContain(part);
    }
  });
});

describe('loadConfig refuses what would fail later or silently', () => {
  it('refuses an unknown TB_* variable, not other programs’ or non-TB ones', () => {
    const error = configError({ ...MINIMAL, TB_LOCK_TTL: '20000' });
    expect(error.setting).toBe('TB_LOCK_TTL');
    expect(error.message).toContain('is not a broker setting');
    expect(() =>
      loadConfig({
        ...MINIMAL,
        TB_SIDECAR_PORT: '8181',
        TB_BROKER_ADDRESS: '127.0.0.1:50051',
        TB_TELEMETRY: 'off',
        OTEL_SERVICE_NAME: 'token-broker',
      }),
    ).not.toThrow();
  });

  it.each(['50051', 'localhost', ':50051', '127.0.0.1:65536', 'unix:/tmp/x', 'a b:1'])(
    'refuses TB_GRPC_ADDRESS=%s',
    (address) => {
      expect(configError({ ...MINIMAL, TB_GRPC_ADDRESS: address }).setting).toBe('TB_GRPC_ADDRESS');
    },
  );

  it.each(['0.0.0.0:50051', '[::]:50051', '127.0.0.1:0', 'broker.example:443'])(
    'accepts TB_GRPC_ADDRESS=%s',
    (address) => {
      expect(loadConfig({ ...MINIMAL, TB_GRPC_ADDRESS: address }).grpcAddress).toBe(address);
    },
  );

  it.each([
    ['TB_CLAIM_POLL_MS', '3000000000', 'must be at most 2147483647'],
    ['TB_LOCK_TTL_MS', '100000000000000000000000', 'must be at most 600000'],
    ['TB_CLAIM_BATCH', '1001', 'must be at most 1000'],
    ['TB_REDIS_CONNECT_TIMEOUT_MS', '600001', 'must be at most 600000'],
  ])('bounds %s from above', (variable, value, problem) => {
    const error = configError({ ...MINIMAL, [variable]: value });
    expect(error.setting).toBe(variable);
    expect(error.message).toContain(problem);
  });
});

describe('the list of broker variables', () => {
  it('names every TB_* variable config.ts reads, so none is refused as unknown', () => {
    const source = readFileSync(new URL('../../broker/config.ts', import.meta.url), 'utf8');
    const read = new Set([...source.matchAll(/'(TB_[A-Z0-9_]+)'/g)].map((m) => m[1]!));
    const missing = [...read].filter(
      (name) =>
        !BROKER_VARIABLES.has(name) &&
        !name.startsWith('TB_SIDECAR_') &&
        !name.startsWith('TB_BROKER_'),
    );
    expect(missing).toEqual([]);
  });
});
