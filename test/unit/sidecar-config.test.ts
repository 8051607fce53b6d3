import { describe, expect, it } from 'vitest';
import { isAllowedUser, loadSidecarConfig } from '../../sidecar/config.js';
import { ConfigError } from '../../sidecar/errors.js';

const BASE = { TB_SIDECAR_BROKER_ADDRESS: 'dns:///token-broker:50051' };

function failure(env: Record<string, string>): ConfigError {
  try {
    loadSidecarConfig(env);
  } catch (err) {
    if (err instanceof ConfigError) return err;
    throw err;
  }
  throw new Error('expected a configuration error');
}

describe('sidecar configuration', () => {
  it('has the documented defaults', () => {
    expect(loadSidecarConfig(BASE)).toEqual({
      brokerAddress: 'dns:///token-broker:50051',
      port: 8181,
      socketPath: undefined,
      safetySkewMs: 10_000,
      users: [],
      idleUnsubscribeMs: 900_000,
      maxWaitMs: 30_000,
      tokenDir: undefined,
      logLevel: 'info',
      reconnectMaxMs: 10_000,
      keepaliveMs: 3_000,
      brokerTls: { caFile: undefined, serverName: undefined },
      tokenFile: '/var/run/secrets/tokens/token-broker',
      allowedUsers: undefined,
      maxUsers: 1000,
    });
  });

  it('serves only allowed users: TB_SIDECAR_ALLOWED_USERS, else the listed users, else anyone', () => {
    const allowed = loadSidecarConfig({
      ...BASE,
      TB_SIDECAR_USERS: 'diku/alice',
      TB_SIDECAR_ALLOWED_USERS: 'diku/*, other/svc-*',
    }).allowedUsers;
    expect(isAllowedUser(allowed, { tenant: 'diku', user: 'anyone' })).toBe(true);
    expect(isAllowedUser(allowed, { tenant: 'other', user: 'svc-import' })).toBe(true);
    expect(isAllowedUser(allowed, { tenant: 'other', user: 'alice' })).toBe(false);
    expect(isAllowedUser(allowed, { tenant: 'diku2', user: 'alice' })).toBe(false);
    const listed = loadSidecarConfig({ ...BASE, TB_SIDECAR_USERS: 'diku/a*' }).allowedUsers;
    // A listed id is literal, never a pattern.
    expect(isAllowedUser(listed, { tenant: 'diku', user: 'a*' })).toBe(true);
    expect(isAllowedUser(listed, { tenant: 'diku', user: 'alice' })).toBe(false);
    expect(isAllowedUser(loadSidecarConfig(BASE).allowedUsers, { tenant: 'x', user: 'y' })).toBe(
      true,
    );
    expect(failure({ ...BASE, TB_SIDECAR_ALLOWED_USERS: 'diku' }).setting).toBe(
      'TB_SIDECAR_ALLOWED_USERS[0]',
    );
    expect(
      failure({ ...BASE, TB_SIDECAR_USERS: 'other/bob', TB_SIDECAR_ALLOWED_USERS: 'diku/*' })
        .setting,
    ).toBe('TB_SIDECAR_USERS[0]');
    expect(failure({ ...BASE, TB_SIDECAR_MAX_USERS: '0' }).setting).toBe('TB_SIDECAR_MAX_USERS');
    expect(
      failure({ ...BASE, TB_SIDECAR_USERS: 'd/a,d/b', TB_SIDECAR_MAX_USERS: '1' }).setting,
    ).toBe('TB_SIDECAR_USERS');
  });

  it('speaks TLS with a token unless told otherwise explicitly', () => {
    expect(
      loadSidecarConfig({
        ...BASE,
        TB_SIDECAR_BROKER_CA_FILE: '/ca/ca.crt',
        TB_SIDECAR_BROKER_SERVER_NAME: 'token-broker.tb.svc',
        TB_SIDECAR_TOKEN_FILE: '/tokens/tb',
      }),
    ).toMatchObject({
      brokerTls: { caFile: '/ca/ca.crt', serverName: 'token-broker.tb.svc' },
      tokenFile: '/tokens/tb',
    });
    expect(
      loadSidecarConfig({ ...BASE, TB_SIDECAR_BROKER_TLS: 'off', TB_SIDECAR_AUTH: 'off' }),
    ).toMatchObject({ brokerTls: 'off', tokenFile: undefined });
    expect(
      failure({ ...BASE, TB_SIDECAR_BROKER_TLS: 'off', TB_SIDECAR_BROKER_CA_FILE: '/ca' }).setting,
    ).toBe('TB_SIDECAR_BROKER_CA_FILE');
    expect(failure({ ...BASE, TB_SIDECAR_AUTH: 'off', TB_SIDECAR_TOKEN_FILE: '/t' }).setting).toBe(
      'TB_SIDECAR_TOKEN_FILE',
    );
    expect(failure({ ...BASE, TB_SIDECAR_BROKER_TLS: 'maybe' }).message).toMatch(
      /^TB_SIDECAR_BROKER_TLS must be on or off/,
    );
  });

  it('reads every variable', () => {
    const config = loadSidecarConfig({
      TB_SIDECAR_BROKER_ADDRESS: 'ipv4:10.0.0.1:50051,10.0.0.2:50051',
      TB_SIDECAR_PORT: '9000',
      TB_SIDECAR_SOCKET: '/run/tb/sidecar.sock',
      TB_SIDECAR_SAFETY_SKEW_MS: '2000',
      TB_SIDECAR_USERS: ' diku/alice, diku/bob ,diku/alice, other/svc@x ',
      TB_SIDECAR_IDLE_UNSUBSCRIBE_MS: '60000',
      TB_SIDECAR_MAX_WAIT_MS: '5000',
      TB_SIDECAR_TOKEN_DIR: '/run/tb/tokens',
      TB_SIDECAR_LOG_LEVEL: 'debug',
      TB_SIDECAR_RECONNECT_MAX_MS: '3000',
      TB_SIDECAR_KEEPALIVE_MS: '20000',
    });
    expect(config).toMatchObject({
      port: 9000,
      socketPath: '/run/tb/sidecar.sock',
      safetySkewMs: 2_000,
      users: [
        { tenant: 'diku', user: 'alice' },
        { tenant: 'diku', user: 'bob' },
        { tenant: 'other', user: 'svc@x' },
      ],
      idleUnsubscribeMs: 60_000,
      maxWaitMs: 5_000,
      tokenDir: '/run/tb/tokens',
      logLevel: 'debug',
      reconnectMaxMs: 3_000,
      keepaliveMs: 20_000,
    });
  });

  it.each([
    '127.0.0.1:50051',
    'localhost:50051',
    'token-broker.ns.svc:50051',
    '[::1]:50051',
    'dns:token-broker:50051',
    'dns://8.8.8.8/token-broker:50051',
    'unix:/run/broker.sock',
  ])('accepts the broker address %s', (address) => {
    expect(loadSidecarConfig({ TB_SIDECAR_BROKER_ADDRESS: address }).brokerAddress).toBe(address);
  });

  it.each<[Record<string, string>, string, RegExp]>([
    [{}, 'TB_SIDECAR_BROKER_ADDRESS', /is required/],
    [{ TB_SIDECAR_BROKER_ADDRESS: 'token-broker' }, 'TB_SIDECAR_BROKER_ADDRESS', /host:port/],
    [{ TB_SIDECAR_BROKER_ADDRESS: 'dns:///token-broker' }, 'TB_SIDECAR_BROKER_ADDRESS', /port/],
    [{ TB_SIDECAR_BROKER_ADDRESS: 'a b:1' }, 'TB_SIDECAR_BROKER_ADDRESS', /spaces/],
    [{ ...BASE, TB_SIDECAR_PORT: 'http' }, 'TB_SIDECAR_PORT', /whole number/],
    [{ ...BASE, TB_SIDECAR_PORT: '70000' }, 'TB_SIDECAR_PORT', /at most 65535/],
    [{ ...BASE, TB_SIDECAR_SAFETY_SKEW_MS: '-1' }, 'TB_SIDECAR_SAFETY_SKEW_MS', /whole number/],
    [{ ...BASE, TB_SIDECAR_USERS: 'diku' }, 'TB_SIDECAR_USERS[0]', /tenant\/user/],
    [{ ...BASE, TB_SIDECAR_USERS: 'diku/a,x/y/z' }, 'TB_SIDECAR_USERS[1]', /one "\/"/],
    [{ ...BASE, TB_SIDECAR_USERS: '/alice' }, 'TB_SIDECAR_USERS[0]', /tenant must not be empty/],
    [
      { ...BASE, TB_SIDECAR_USERS: 'diku/..', TB_SIDECAR_TOKEN_DIR: '/tmp/t' },
      'TB_SIDECAR_USERS[0]',
      /file name/,
    ],
    [{ ...BASE, TB_SIDECAR_IDLE_UNSUBSCRIBE_MS: '10' }, 'TB_SIDECAR_IDLE_UNSUBSCRIBE_MS', /least/],
    [{ ...BASE, TB_SIDECAR_MAX_WAIT_MS: '9999999' }, 'TB_SIDECAR_MAX_WAIT_MS', /at most/],
    [{ ...BASE, TB_SIDECAR_LOG_LEVEL: 'loud' }, 'TB_SIDECAR_LOG_LEVEL', /one of/],
    [{ ...BASE, TB_SIDECAR_RECONNECT_MAX_MS: '1' }, 'TB_SIDECAR_RECONNECT_MAX_MS', /least 100/],
    [{ ...BASE, TB_SIDECAR_KEEPALIVE_MS: '500' }, 'TB_SIDECAR_KEEPALIVE_MS', /ping/],
    [{ ...BASE, TB_SIDECAR_WAIT_MS: '5' }, 'TB_SIDECAR_WAIT_MS', /not a sidecar setting/],
  ])('refuses %j naming %s', (env, setting, problem) => {
    const err = failure(env);
    expect(err.setting).toBe(setting);
    expect(err.message.startsWith(setting)).toBe(true);
    expect(err.message).toMatch(problem);
  });
});
