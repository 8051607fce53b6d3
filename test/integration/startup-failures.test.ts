/**
 * Start-up failures of the real broker and sidecar processes: each exits 2 with a fatal line that
 * names the variable at fault (issue 13, item 6), instead of a stack trace, exit 1, a silently
 * ignored setting or a timer that overflows.
 */
import { createServer, type Server } from 'node:net';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { devIdentity } from '../../scripts/dev/dev-identity.js';
import { spawnNodeProcess, waitForLog, type LogEntry } from '../../scripts/dev/node-process.js';
import { startRedisNodes } from '../../scripts/dev/redis-nodes.js';

/** Embedded mode, plaintext, no caller authentication: the fewest settings that start a broker. */
const BROKER: Record<string, string> = {
  TB_GRPC_ADDRESS: '127.0.0.1:0',
  TB_TLS: 'off',
  TB_AUTH: 'off',
  TB_IDP_TOKEN_ENDPOINT: 'http://127.0.0.1:9/token',
  TB_IDP_CLIENT_ID: 'broker',
  TB_IDP_CLIENT_SECRET: 'not-a-real-secret',
};

const SIDECAR: Record<string, string> = {
  TB_SIDECAR_BROKER_ADDRESS: '127.0.0.1:9',
  TB_SIDECAR_BROKER_TLS: 'off',
  TB_SIDECAR_AUTH: 'off',
};

interface Exit {
  code: number | null;
  logs: LogEntry[];
  output: string;
}

/** Runs `entry` until it exits (killed after 20 s: a process that keeps running fails the test). */
async function runUntilExit(entry: string, env: Record<string, string>): Promise<Exit> {
  const proc = spawnNodeProcess(entry, env);
  const timer = setTimeout(() => proc.child.kill('SIGKILL'), 20_000);
  const code = await proc.exited;
  clearTimeout(timer);
  return { code, logs: proc.logs, output: proc.output() };
}

/** Exit code 2 and one fatal line that names `variable` in its `setting` and its message. */
function expectRefused(exit: Exit, variable: string): void {
  const fatal = exit.logs.filter((entry) => entry.level === 60);
  expect({ code: exit.code, fatal: fatal.map((e) => ({ setting: e.setting })) }).toEqual({
    code: 2,
    fatal: [{ setting: variable }],
  });
  expect(fatal[0]!.msg).toContain(variable);
  expect(exit.output).not.toMatch(/\n\s+at /); // no stack trace
  expect(exit.output).not.toContain('not-a-real-secret');
}

const broker = (env: Record<string, string>) =>
  runUntilExit('broker/main.ts', { ...BROKER, ...env });

describe('broker start-up failures exit 2 naming the variable', () => {
  it('TB_LOG_LEVEL=verbose', async () => {
    expectRefused(await broker({ TB_LOG_LEVEL: 'verbose' }), 'TB_LOG_LEVEL');
  });

  it.each(['50051', 'localhost', '127.0.0.1:70000', 'http://127.0.0.1:50051', '127.0.0.1:'])(
    'TB_GRPC_ADDRESS=%s',
    async (address) => {
      expectRefused(await broker({ TB_GRPC_ADDRESS: address }), 'TB_GRPC_ADDRESS');
    },
  );

  describe('a port in use', () => {
    let holder: Server;
    let port: number;
    beforeAll(async () => {
      holder = createServer();
      await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
      port = (holder.address() as { port: number }).port;
    });
    afterAll(() => new Promise<void>((resolve) => holder.close(() => resolve())));

    it('TB_GRPC_ADDRESS', async () => {
      expectRefused(await broker({ TB_GRPC_ADDRESS: `127.0.0.1:${port}` }), 'TB_GRPC_ADDRESS');
    });
  });

  it('an unreachable TB_REDIS_URL, after a bounded wait', async () => {
    // A port just closed: nothing answers there.
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as { port: number }).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    const started = Date.now();
    const exit = await broker({
      TB_REDIS_URL: `redis://:not-a-real-secret@127.0.0.1:${port}`,
      TB_SEALING_KEYS: `k1:${Buffer.from(Array.from({ length: 32 }, (_, i) => i + 1)).toString('base64')}`,
      TB_REDIS_CONNECT_TIMEOUT_MS: '1000',
    });
    expectRefused(exit, 'TB_REDIS_URL');
    expect(Date.now() - started).toBeLessThan(15_000);
  });

  it('a broken TB_POLICY_FILE while the state store and lock nodes connect: never serves', async () => {
    // The policy loads beside the Redis connections (broker-app.ts); its error must still stop
    // the start, with the line at fault, before anything listens.
    const redis = await startRedisNodes(2);
    const dir = mkdtempSync(join(tmpdir(), 'tb-policy-'));
    try {
      const policyFile = join(dir, 'policy.yaml');
      writeFileSync(
        policyFile,
        ['rules:', '  - name: broken', '    subjects: ["ns/*"]', '    verbs: [fly]', ''].join('\n'),
      );
      const exit = await broker({
        ...devIdentity().brokerEnv(),
        TB_TLS: 'on',
        TB_AUTH: 'on',
        TB_POLICY_FILE: policyFile,
        TB_REDIS_URL: redis.urls[0]!,
        TB_REDLOCK_URLS: redis.urls[1]!,
        TB_SEALING_KEYS: `k1:${key(3)}`,
      });
      const fatal = exit.logs.filter((entry) => entry.level === 60);
      expect({ code: exit.code, fatal: fatal.map((e) => ({ setting: e.setting })) }).toEqual({
        code: 2,
        fatal: [{ setting: 'TB_POLICY_FILE' }],
      });
      expect(fatal[0]!.line).toBe(4);
      expect(exit.logs.some((entry) => entry.msg === 'broker serving')).toBe(false);
      expect(exit.output).not.toMatch(/\n\s+at /);
    } finally {
      rmSync(dir, { recursive: true, force: true });
      await redis.stopAll();
    }
  });

  const key = (seed: number) =>
    Buffer.from(Array.from({ length: 32 }, (_, i) => (seed * 31 + i * 7) % 256)).toString('base64');
  it.each([
    ['an all-zero key', `k1:${Buffer.alloc(32).toString('base64')}`],
    ['a key of one byte value', `k1:${key(1)},k2:${Buffer.alloc(32, 0x41).toString('base64')}`],
    ['the same key under two kids', `k-new:${key(2)},k-old:${key(2)}`],
  ])('TB_SEALING_KEYS with %s', async (_what, keys) => {
    const exit = await broker({
      TB_REDIS_URL: 'redis://127.0.0.1:9',
      TB_SEALING_KEYS: keys,
    });
    expectRefused(exit, 'TB_SEALING_KEYS');
    for (const entry of keys.split(','))
      expect(exit.output).not.toContain(
        entry.slice(entry.indexOf(':') + 1, entry.indexOf(':') + 13),
      );
  });

  it.each([
    ['TB_LOCK_TTL_MS', '100000000000000000000000'],
    ['TB_CLAIM_POLL_MS', '3000000000'],
    ['TB_SHUTDOWN_GRACE_MS', '2147483648'],
    ['TB_ROTATION_CONCURRENCY', '1000000'],
  ])('%s=%s (past its upper bound)', async (variable, value) => {
    expectRefused(await broker({ [variable]: value }), variable);
  });

  it('a misspelt TB_* variable', async () => {
    expectRefused(await broker({ TB_LOCK_TTL: '20000' }), 'TB_LOCK_TTL');
  });

  it('starts with other programs’ variables beside it (the sidecar’s, tbctl’s)', async () => {
    const proc = spawnNodeProcess('broker/main.ts', {
      ...BROKER,
      TB_SIDECAR_PORT: '8181',
      TB_BROKER_ADDRESS: '127.0.0.1:50051',
      TB_SHUTDOWN_GRACE_MS: '0',
    });
    await waitForLog(proc, 'broker', (entry) => entry.msg === 'broker serving');
    expect(await proc.stop()).toBe(0);
  });
});

describe('sidecar start-up failures exit 2 naming the variable', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'tb-sidecar-socket-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const sidecar = (env: Record<string, string>) =>
    runUntilExit('sidecar/main.ts', { ...SIDECAR, ...env });

  it('TB_SIDECAR_SOCKET in a directory that does not exist', async () => {
    expectRefused(
      await sidecar({ TB_SIDECAR_SOCKET: join(dir, 'missing', 'sidecar.sock') }),
      'TB_SIDECAR_SOCKET',
    );
  });

  it('TB_SIDECAR_SOCKET longer than a Unix socket path may be', async () => {
    expectRefused(
      await sidecar({ TB_SIDECAR_SOCKET: join(dir, `${'s'.repeat(120)}.sock`) }),
      'TB_SIDECAR_SOCKET',
    );
  });
});
