/**
 * RedlockLockService.waitForQuorum on real Redis nodes: the broker's start waits for a majority of
 * lock nodes to be connected, as soon as they are (no poll interval), and at most the timeout when
 * too many are down. Locks taken right after it resolves succeed.
 */
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RedlockLockService } from '../../broker/lock/redlock-lock-service.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const log = pino({ level: 'silent' });
let redis: RedisNodes;
const services: RedlockLockService[] = [];

function service(urls: readonly string[]): RedlockLockService {
  const s = new RedlockLockService(
    {
      urls: [...urls],
      ttlMs: 2_000,
      extendBeforeMs: 500,
      retryCount: 0,
      retryDelayMs: 50,
      commandTimeoutMs: 500,
    },
    log,
  );
  services.push(s);
  return s;
}

beforeAll(async () => {
  redis = await startRedisNodes(3);
});

afterAll(async () => {
  await Promise.all(services.map((s) => s.close()));
  await redis?.stopAll();
});

describe('waiting for a quorum of lock nodes', () => {
  it('resolves once a majority is connected, long before the timeout, and a lock can be taken', async () => {
    // The third node is down: two of three is the quorum.
    await redis.nodes[2]!.stop();
    const locks = service(redis.urls);
    const started = Date.now();
    const ready = await locks.waitForQuorum(10_000);
    expect(ready).toBe(2);
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(await locks.withLock('tb:test:quorum', () => Promise.resolve('held'))).toBe('held');
  });

  it('gives up at the timeout with what it has when no majority can connect', async () => {
    await redis.nodes[1]!.stop();
    const locks = service(redis.urls);
    const started = Date.now();
    const ready = await locks.waitForQuorum(600);
    expect(ready).toBe(1);
    expect(Date.now() - started).toBeGreaterThanOrEqual(590);
  });

  it('resolves when a node that was down comes up within the timeout', async () => {
    // Nodes 1 and 2 are down (previous tests): the quorum comes with node 1's return.
    const locks = service(redis.urls);
    const waiting = locks.waitForQuorum(20_000);
    await redis.nodes[1]!.restart();
    expect(await waiting).toBeGreaterThanOrEqual(2);
  });
});
