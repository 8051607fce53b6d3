import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../broker/config.js';
import { ConfigError } from '../../broker/errors.js';
import { keySlot } from '../../broker/store/sharded-events.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import { RetentionSweeper } from '../../broker/store/retention-sweeper.js';
import { pino } from 'pino';
import type { SessionRecord, SessionStatusName } from '../../broker/store/session-record.js';

const BASE = {
  TB_IDP_TOKEN_ENDPOINT: 'https://idp.example/token',
  TB_IDP_CLIENT_ID: 'token-broker',
  TB_IDP_CLIENT_SECRET: 'client-secret',
  TB_TLS_CERT_FILE: '/var/run/secrets/token-broker-tls/tls.crt',
  TB_TLS_KEY_FILE: '/var/run/secrets/token-broker-tls/tls.key',
  TB_AUTH_ISSUER: 'https://kubernetes.default.svc.cluster.local',
  TB_POLICY_FILE: '/etc/token-broker/policy/policy.yaml',
  TB_SEALING_KEYS: 'k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=',
} as const;
const LOCKS = 'redis://a:6379,redis://b:6379,redis://c:6379';

function problem(env: Record<string, string>): { setting: string; message: string } {
  try {
    loadConfig(env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return { setting: (err as ConfigError).setting, message: (err as Error).message };
  }
  throw new Error('expected a ConfigError');
}

const dir = mkdtempSync(join(tmpdir(), 'tb-state-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('state store shapes in the configuration', () => {
  it('reads Sentinel with its master, passwords from files and TLS', () => {
    const data = join(dir, 'data-password');
    const sentinel = join(dir, 'sentinel-password');
    const ca = join(dir, 'ca.pem');
    writeFileSync(data, 'data-secret\n');
    writeFileSync(sentinel, 'sentinel-secret');
    writeFileSync(ca, '-----BEGIN CERTIFICATE-----\n');
    const config = loadConfig({
      ...BASE,
      TB_REDIS_SENTINELS: 's0.example:26379, [::1]:26380',
      TB_REDIS_SENTINEL_MASTER: 'tokens',
      TB_REDIS_SENTINEL_PASS_FILE: sentinel,
      TB_REDIS_PASSWORD_FILE: data,
      TB_REDIS_TLS: 'on',
      TB_REDIS_CA_FILE: ca,
      TB_REDLOCK_URLS: LOCKS,
      TB_REDIS_MIN_REPLICAS: '2',
      TB_SESSION_RETENTION_MS: '86400000',
    });
    expect(config.stateStore).toEqual({
      kind: 'sentinel',
      sentinels: [
        { host: 's0.example', port: 26379 },
        { host: '::1', port: 26380 },
      ],
      master: 'tokens',
      password: 'data-secret',
      sentinelPassword: 'sentinel-secret',
      tls: { ca: '-----BEGIN CERTIFICATE-----\n' },
    });
    expect(config.redisUrl).toBeUndefined();
    expect(config.redisMinReplicas).toBe(2);
    expect(config.sessionRetentionMs).toBe(86_400_000);
    // Locks stay on the independent masters, with the data password put in.
    expect(config.redlockUrls.every((u) => new URL(u).password === 'data-secret')).toBe(true);
  });

  it('reads a Cluster; defaults: MIN_REPLICAS detected at start, 7 days of retention', () => {
    const config = loadConfig({
      ...BASE,
      TB_REDIS_CLUSTER_NODES: 'n1:7000,n2:7001',
      TB_REDLOCK_URLS: LOCKS,
    });
    expect(config.stateStore).toEqual({
      kind: 'cluster',
      nodes: [
        { host: 'n1', port: 7000 },
        { host: 'n2', port: 7001 },
      ],
      password: undefined,
      tls: undefined,
    });
    expect(config.redisMinReplicas).toBeUndefined();
    expect(config.sessionRetentionMs).toBe(7 * 24 * 3_600_000);
    expect(loadConfig({ ...BASE, TB_REDIS_URL: 'redis://x:6379' }).stateStore).toEqual({
      kind: 'single',
      url: 'redis://x:6379',
    });
  });

  it('refuses what would go wrong, naming the setting', () => {
    const cases: [Record<string, string>, string, RegExp][] = [
      [
        {
          TB_REDIS_URL: 'redis://x:6379',
          TB_REDIS_CLUSTER_NODES: 'n1:7000',
          TB_REDLOCK_URLS: LOCKS,
        },
        'TB_REDIS_CLUSTER_NODES',
        /exclusive/,
      ],
      [
        { TB_REDIS_SENTINELS: 's:26379', TB_REDIS_SENTINEL_MASTER: 'm' },
        'TB_REDLOCK_URLS',
        /independent/,
      ],
      [
        { TB_REDIS_SENTINELS: 's:26379', TB_REDLOCK_URLS: LOCKS },
        'TB_REDIS_SENTINEL_MASTER',
        /required/,
      ],
      [{ TB_REDIS_SENTINELS: 's', TB_REDLOCK_URLS: LOCKS }, 'TB_REDIS_SENTINELS[0]', /host:port/],
      [
        { TB_REDIS_CLUSTER_NODES: 'n:99999', TB_REDLOCK_URLS: LOCKS },
        'TB_REDIS_CLUSTER_NODES[0]',
        /host:port/,
      ],
      [
        { TB_REDIS_URL: 'redis://x:6379', TB_REDIS_SENTINEL_MASTER: 'm' },
        'TB_REDIS_SENTINEL_MASTER',
        /needs TB_REDIS_SENTINELS/,
      ],
      [{ TB_REDIS_URL: 'redis://x:6379', TB_REDIS_TLS: 'on' }, 'TB_REDIS_TLS', /rediss/],
      [
        { TB_REDIS_CLUSTER_NODES: 'n:7000', TB_REDLOCK_URLS: LOCKS, TB_REDIS_CA_FILE: '/x' },
        'TB_REDIS_CA_FILE',
        /TB_REDIS_TLS=on/,
      ],
      [
        { TB_REDIS_URL: 'redis://x:6379', TB_REDIS_MIN_REPLICAS: 'one' },
        'TB_REDIS_MIN_REPLICAS',
        /whole number/,
      ],
      [{ TB_REDIS_URL: 'redis://x:6379', TB_KEY_PREFIX: 'tb{x}:' }, 'TB_KEY_PREFIX', /\{ or \}/],
      [
        { TB_REDIS_URL: 'redis://x:6379', TB_SESSION_RETENTION_MS: '10' },
        'TB_SESSION_RETENTION_MS',
        /at least 1000/,
      ],
    ];
    for (const [env, setting, message] of cases) {
      const got = problem({ ...BASE, ...env });
      expect(got.setting, JSON.stringify(env)).toBe(setting);
      expect(got.message).toMatch(message);
    }
  });
});

describe('keySlot', () => {
  it('is the Redis Cluster slot (CRC16 XMODEM of the hash tag, mod 16384)', () => {
    // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
    expect(keySlot('123456789')).toBe(0x31c3);
    expect(keySlot('foo')).toBe(12182);
    expect(keySlot('{foo}.bar')).toBe(12182);
    expect(keySlot('{}foo')).not.toBe(keySlot(''));
  });
});

describe('MemorySessionStore retention', () => {
  const record = (user: string, generation: number, status: SessionStatusName) =>
    ({ tenant: 'diku', user, generation, status }) as SessionRecord;

  it('deletes only sessions dead since before the cutoff, at most `limit` per call', async () => {
    const store = new MemorySessionStore();
    for (let i = 0; i < 5; i++)
      await store.commit({ next: record(`d${i}`, 1, 'REVOKED'), dueAt: undefined }, null, 100);
    await store.commit({ next: record('live', 1, 'ACTIVE'), dueAt: 5 }, null, 100);
    await store.commit({ next: record('late', 1, 'IDLE'), dueAt: undefined }, null, 900);
    expect(await store.sweepDead(500, 3)).toBe(3);
    expect(await store.sweepDead(500, 3)).toBe(2);
    expect(await store.sweepDead(500, 3)).toBe(0);
    const users = (await store.list('', '', 10)).sessions.map((s) => s.record.user);
    expect(users).toEqual(['late', 'live']);
  });
});

describe('RetentionSweeper.run', () => {
  it('stops at once when aborted during a sweep (not after its interval)', async () => {
    const controller = new AbortController();
    let calls = 0;
    const store = {
      sweepDead: () => {
        calls += 1;
        controller.abort(); // The broker stops while this sweep is in flight.
        return Promise.resolve(0);
      },
    };
    const sweeper = new RetentionSweeper(
      { retentionMs: 1_000, batchSize: 10, intervalMs: 60_000 },
      store,
      pino({ level: 'silent' }),
    );
    const outcome = await Promise.race([
      sweeper.run(controller.signal).then(() => 'stopped'),
      new Promise((r) => setTimeout(() => r('still sleeping'), 2_000)),
    ]);
    expect(outcome).toBe('stopped');
    expect(calls).toBe(1);
  });
});
