/**
 * The bundled Redis as the chart renders it — redis.conf, the start command that reads the
 * password from the mounted Secret file and feeds it on stdin, the probe — run with a real
 * redis-server (the one the tests use); then the broker's own configuration, given that file as
 * TB_REDIS_PASSWORD_FILE the way the chart mounts it, logs in.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../broker/config.js';
import { freePort } from '../../scripts/dev/free-port.js';
import { find, HelmCharts } from './helm-harness.js';

const PASSWORD = 'Zq4pTn8vW2xY6bC1dF3gH5jK7mL9';
const serverBin = process.env['TB_REDIS_SERVER_BIN'] || 'redis-server';
// Where the chart mounts the Redis Secret, in the Redis pod and the broker pod alike.
const SECRET_DIR = '/var/run/secrets/token-broker-redis';

let dir: string;
let port: number;
let server: ChildProcess;
let probe: string;
let secretDir: string;
let brokerEnv: Array<{ name: string; value?: string; valueFrom?: unknown }>;
let redisEnv: unknown;

function cli(args: string[], auth = true): string {
  const env = { ...process.env, ...(auth ? { REDISCLI_AUTH: PASSWORD } : {}) };
  return execFileSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args], {
    env,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
  }).trim();
}

beforeAll(async () => {
  const charts = HelmCharts.setUp();
  const objects = charts.render(charts.broker, ['minimal.yaml']);
  charts.tearDown();
  const config = find(objects, 'ConfigMap', 'token-broker-redis') as unknown as {
    data: { 'redis.conf': string };
  };
  const container = (
    find(objects, 'StatefulSet', 'token-broker-redis') as unknown as {
      spec: { template: { spec: { containers: Array<Record<string, unknown>> } } };
    }
  ).spec.template.spec.containers[0]!;
  const command = container.command as string[];
  probe = (container.readinessProbe as { exec: { command: string[] } }).exec.command[2]!;
  redisEnv = container.env;
  brokerEnv = (
    find(objects, 'Deployment') as unknown as {
      spec: { template: { spec: { containers: Array<{ env: typeof brokerEnv }> } } };
    }
  ).spec.template.spec.containers[0]!.env;

  dir = mkdtempSync(join(tmpdir(), 'tb-redis-conf-'));
  // The kubelet's copy of the Secret key, as a file (no trailing newline, as Kubernetes writes it).
  secretDir = join(dir, 'secret');
  mkdirSync(secretDir);
  writeFileSync(join(secretDir, 'redis-password'), PASSWORD);
  port = await freePort();
  // Only what a cluster decides differs here: the port, the data folder, and loopback only.
  const conf = config.data['redis.conf']
    .replace(/^port 6379$/m, `port ${port}`)
    .replace(/^dir \/data$/m, `dir ${dir}`)
    .replace(/^bind .*$/m, 'bind 127.0.0.1');
  writeFileSync(join(dir, 'redis.conf'), conf);
  expect(command.slice(0, 2)).toEqual(['sh', '-c']);
  expect(command[2]).toContain(SECRET_DIR);
  const script = command[2]!
    .replace('/etc/redis/redis.conf', join(dir, 'redis.conf'))
    .replaceAll(SECRET_DIR, secretDir)
    .replace(/^exec redis-server /m, `exec ${serverBin} `);
  server = spawn('sh', ['-c', script], { env: { ...process.env }, stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    try {
      if (cli(['ping']) === 'PONG') return;
    } catch {
      // not listening yet
    }
    await sleep(50);
  }
  throw new Error('the rendered Redis command did not start a server');
}, 60_000);

afterAll(async () => {
  server?.kill('SIGTERM');
  if (server && server.exitCode === null) await new Promise((r) => server.once('exit', r));
  rmSync(dir, { recursive: true, force: true });
});

describe('bundled Redis configuration', () => {
  it('requires the password from the Secret file, which no command line or environment shows', () => {
    expect(cli(['ping'], false)).toMatch(/NOAUTH/);
    expect(cli(['ping'])).toBe('PONG');
    const cmdline = readFileSync(`/proc/${server.pid}/cmdline`, 'utf8');
    expect(cmdline).toContain('redis-server');
    expect(cmdline.includes(PASSWORD)).toBe(false);
    expect(readFileSync(`/proc/${server.pid}/environ`, 'utf8').includes(PASSWORD)).toBe(false);
    // The rendered containers pass it in no variable: Redis has none, the broker a file's path.
    expect(redisEnv).toBeUndefined();
    expect(JSON.stringify(brokerEnv)).not.toMatch(/secretKeyRef|TB_REDIS_PASSWORD"/);
    expect(brokerEnv.find((e) => e.name === 'TB_REDIS_PASSWORD_FILE')?.value).toBe(
      `${SECRET_DIR}/redis-password`,
    );
  });

  it('lets the broker in with TB_REDIS_PASSWORD_FILE, as the chart sets it', async () => {
    const values = (name: string) => brokerEnv.find((e) => e.name === name)!.value!.split(',');
    // The rendered lock URLs carry no password; only the host differs here (this Redis on
    // loopback). The bundled state store is reached through its sentinels (host:port only).
    for (const url of values('TB_REDLOCK_URLS')) expect(new URL(url).password).toBe('');
    expect(brokerEnv.some((e) => e.name === 'TB_REDIS_URL')).toBe(false);
    for (const sentinel of values('TB_REDIS_SENTINELS'))
      expect(sentinel).toMatch(/^[a-z0-9.-]+:26379$/);
    const local = `redis://127.0.0.1:${port}`;
    const config = loadConfig({
      TB_REDIS_URL: local,
      TB_REDLOCK_URLS: [local, local, local].join(','),
      TB_REDIS_PASSWORD_FILE: join(secretDir, 'redis-password'),
      TB_SEALING_KEYS: `k1:${Buffer.alloc(32, 7).toString('base64')}`,
      TB_IDP_TOKEN_ENDPOINT: 'https://idp.example/token',
      TB_IDP_CLIENT_ID: 'token-broker',
      TB_IDP_CLIENT_SECRET: 'client-secret',
      TB_TLS: 'off',
      TB_AUTH: 'off',
    });
    for (const url of [config.redisUrl!, ...config.redlockUrls]) {
      const client = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0 });
      try {
        await client.connect();
        expect(await client.ping()).toBe('PONG');
      } finally {
        client.disconnect();
      }
    }
    // The same URL without the file's password is refused: the file is what let it in.
    const bare = new Redis(local, { lazyConnect: true, maxRetriesPerRequest: 0 });
    const errors: Error[] = [];
    bare.on('error', (err: Error) => errors.push(err));
    try {
      await expect(bare.connect().then(() => bare.ping())).rejects.toThrow();
      expect(errors.map((e) => e.message).join('\n')).toMatch(/NOAUTH/);
    } finally {
      bare.disconnect();
    }
  });

  it('persists every write to the append-only file, never evicts, and is no replica', () => {
    expect(cli(['config', 'get', 'appendonly'])).toBe('appendonly\nyes');
    expect(cli(['config', 'get', 'appendfsync'])).toBe('appendfsync\nalways');
    expect(cli(['config', 'get', 'maxmemory-policy'])).toBe('maxmemory-policy\nnoeviction');
    expect(cli(['config', 'get', 'maxmemory'])).toBe(`maxmemory\n${200 * 1024 * 1024}`);
    expect(cli(['role']).split('\n')[0]).toBe('master');
    expect(cli(['set', 'probe-key', '1'])).toBe('OK');
  });

  it('has the destructive commands disabled', () => {
    expect(cli(['flushall'])).toMatch(/unknown command/);
  });

  it('answers the readiness probe as rendered, with the password from the Secret file', () => {
    const script = probe.replace('-h 127.0.0.1', `-h 127.0.0.1 -p ${port}`);
    expect(script).not.toBe(probe);
    expect(script).toContain(SECRET_DIR);
    expect(spawnSyncStatus(script.replaceAll(SECRET_DIR, secretDir))).toBe(0);
    const wrong = join(dir, 'wrong');
    mkdirSync(wrong);
    writeFileSync(join(wrong, 'redis-password'), 'wrong-password');
    expect(spawnSyncStatus(script.replaceAll(SECRET_DIR, wrong))).not.toBe(0);
  });
});

function spawnSyncStatus(script: string): number {
  try {
    execFileSync('sh', ['-c', script], { env: { ...process.env }, stdio: 'ignore' });
    return 0;
  } catch (err) {
    return (err as { status: number }).status;
  }
}
