/**
 * The bundled Redis as the chart renders it — redis.conf, the start command that feeds the
 * password on stdin, the probe — run with a real redis-server (the one the tests use).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../scripts/dev/free-port.js';
import { find, HelmCharts } from './helm-harness.js';

const PASSWORD = 'Zq4pTn8vW2xY6bC1dF3gH5jK7mL9';
const serverBin = process.env['TB_REDIS_SERVER_BIN'] || 'redis-server';

let dir: string;
let port: number;
let server: ChildProcess;
let probe: string;

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
    find(objects, 'StatefulSet') as unknown as {
      spec: { template: { spec: { containers: Array<Record<string, unknown>> } } };
    }
  ).spec.template.spec.containers[0]!;
  const command = container.command as string[];
  probe = (container.readinessProbe as { exec: { command: string[] } }).exec.command[2]!;

  dir = mkdtempSync(join(tmpdir(), 'tb-redis-conf-'));
  port = await freePort();
  // Only what a cluster decides differs here: the port, the data folder, and loopback only.
  const conf = config.data['redis.conf']
    .replace(/^port 6379$/m, `port ${port}`)
    .replace(/^dir \/data$/m, `dir ${dir}`)
    .replace(/^bind .*$/m, 'bind 127.0.0.1');
  writeFileSync(join(dir, 'redis.conf'), conf);
  expect(command.slice(0, 2)).toEqual(['sh', '-c']);
  const script = command[2]!
    .replace('/etc/redis/redis.conf', join(dir, 'redis.conf'))
    .replace(/^exec redis-server /m, `exec ${serverBin} `);
  server = spawn('sh', ['-c', script], {
    env: { ...process.env, REDIS_PASSWORD: PASSWORD },
    stdio: 'ignore',
  });
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
  it('requires the password given on stdin, which no command line shows', () => {
    expect(cli(['ping'], false)).toMatch(/NOAUTH/);
    expect(cli(['ping'])).toBe('PONG');
    const cmdline = readFileSync(`/proc/${server.pid}/cmdline`, 'utf8');
    expect(cmdline).toContain('redis-server');
    expect(cmdline).not.toContain(PASSWORD);
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

  it('answers the readiness probe as rendered', () => {
    const script = probe.replace('redis-cli -h 127.0.0.1', `redis-cli -h 127.0.0.1 -p ${port}`);
    expect(script).not.toBe(probe);
    const ok = spawnSyncStatus(script, PASSWORD);
    expect(ok).toBe(0);
    expect(spawnSyncStatus(script, 'wrong-password')).not.toBe(0);
  });
});

function spawnSyncStatus(script: string, password: string): number {
  try {
    execFileSync('sh', ['-c', script], {
      env: { ...process.env, REDIS_PASSWORD: password },
      stdio: 'ignore',
    });
    return 0;
  } catch (err) {
    return (err as { status: number }).status;
  }
}
