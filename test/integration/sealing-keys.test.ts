/**
 * Issue 13, item 5: after a restart with only a new sealing key, a record sealed with the old
 * one answers SEALING_KEY_UNKNOWN (not INTERNAL), is logged naming its key id, is counted, and
 * is skipped by ListSessions while every readable session is still listed. Real Redis, the real
 * OIDC provider, real brokers over TLS with caller authentication.
 */
import { randomBytes } from 'node:crypto';
import { status } from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BrokerClient, rpcError } from '../../scripts/dev/broker-client.js';
import { brokerEnv, randomPrefix, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

let oidc: OidcProviderHarness;
let redis: RedisNodes;

beforeAll(async () => {
  [oidc, redis] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 60 }),
    startRedisNodes(2),
  ]);
});
afterAll(async () => {
  await Promise.all([oidc?.close(), redis?.stopAll()]);
});

/** A logger whose JSON lines the test reads back. */
function capturingLog() {
  const lines: Record<string, unknown>[] = [];
  const log = pino(
    { level: 'info' },
    { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) },
  );
  return { log, lines };
}

describe('a record no configured sealing key opens', () => {
  it('answers SEALING_KEY_UNKNOWN, is logged and counted, is skipped in listings, and opens once its key is back', async () => {
    const prefix = randomPrefix();
    const topology = (keys: string) => ({
      state: redis.urls[0]!,
      locks: [redis.urls[1]!],
      keys,
      prefix,
    });
    const oldKeys = `k-old:${randomBytes(32).toString('base64')}`;
    const newKeys = `k-new:${randomBytes(32).toString('base64')}`;

    const before = await startInProcessBroker(brokerEnv(oidc, topology(oldKeys)));
    const first = new BrokerClient(before.address);
    for (const user of ['alice', 'bob'])
      await first.enroll('t1', user, (await oidc.mintTokens(user)).refresh_token);
    first.close();
    await before.stop();

    // Restarted with only a new key: alice's and bob's records name k-old.
    const { log, lines } = capturingLog();
    const after = await startInProcessBroker(brokerEnv(oidc, topology(newKeys)), log);
    const client = new BrokerClient(after.address);
    try {
      await client.enroll('t1', 'carol', (await oidc.mintTokens('carol')).refresh_token);

      const err = await rpcError(client.getToken('t1', 'alice'));
      expect({
        code: err.code,
        trailer: err.metadata.get('tb-error-code'),
        details: err.details,
      }).toEqual({
        code: status.FAILED_PRECONDITION,
        trailer: ['SEALING_KEY_UNKNOWN'],
        details: 'sealed record uses unknown key id "k-old"',
      });

      const listed = await client.list('t1');
      expect(listed.sessions.map((s) => s.user)).toEqual(['carol']);
      const carol = await client.getToken('t1', 'carol');
      expect(carol.token?.accessToken.length ?? 0).toBeGreaterThan(0);

      const unreadable = lines.filter((l) => l.code === 'SEALING_KEY_UNKNOWN');
      expect(unreadable.length).toBeGreaterThan(0);
      expect(unreadable[0]).toMatchObject({ kid: 'k-old', tenant: 't1', level: 50 });
      expect(String(unreadable[0]!.msg)).toContain('TB_SEALING_KEYS');
      expect(lines.some((l) => l.msg === 'internal error')).toBe(false);
      expect(
        await after.metrics.value('tb_broker_unreadable_records', { code: 'SEALING_KEY_UNKNOWN' }),
      ).toBeGreaterThanOrEqual(3);
    } finally {
      client.close();
      await after.stop();
    }

    // The old key put back (after the sealing one): every record opens again.
    const restored = await startInProcessBroker(brokerEnv(oidc, topology(`${newKeys},${oldKeys}`)));
    const again = new BrokerClient(restored.address);
    try {
      expect((await again.list('t1')).sessions.map((s) => s.user).sort()).toEqual([
        'alice',
        'bob',
        'carol',
      ]);
      const alice = await again.getToken('t1', 'alice');
      expect(alice.token?.accessToken.length ?? 0).toBeGreaterThan(0);
    } finally {
      again.close();
      await restored.stop();
    }
  }, 60_000);
});
