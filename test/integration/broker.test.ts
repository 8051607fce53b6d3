import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../shared/gen/tokenbroker/v1/token_broker.js';
import { BrokerClient } from '../harness/broker-client.js';
import {
  brokerEnv,
  randomPrefix,
  sealingKeys,
  startInProcessBroker,
} from '../harness/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../harness/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../harness/redis-nodes.js';

let oidc: OidcProviderHarness;
let redis: RedisNodes;

beforeAll(async () => {
  [oidc, redis] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 3 }),
    startRedisNodes(4),
  ]);
});
afterAll(async () => {
  await Promise.all([oidc?.close(), redis?.stopAll()]);
});

function redisTopology() {
  return {
    state: redis.urls[0]!,
    locks: redis.urls.slice(1),
    keys: sealingKeys(),
    prefix: randomPrefix(),
  };
}

describe('broker on Redis', () => {
  it('enrolls, rotates the caller copy dead, streams each generation in order', async () => {
    const broker = await startInProcessBroker(brokerEnv(oidc, redisTopology()));
    const client = new BrokerClient(broker.address);
    try {
      const minted = await oidc.mintTokens('alice');
      const enrolled = await client.enroll('diku', 'alice', minted.refresh_token);
      expect(enrolled.session?.generation).toBe(1);
      expect(enrolled.session?.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      // The caller's copy was rotated at once: presenting it now is a reuse.
      expect(oidc.presentationsOf(minted.refresh_token)).toBe(1);

      const watcher = client.watch();
      watcher.subscribe('diku', 'alice');
      await watcher.until(() => (watcher.latest('diku', 'alice')?.generation ?? 0) >= 3, 12_000);
      const generations = watcher.of('diku', 'alice').map((e) => e.generation);
      expect(generations).toEqual([...generations].sort((a, b) => a - b));
      expect(new Set(generations).size).toBe(generations.length);
      const latest = watcher.latest('diku', 'alice')!;
      expect(latest.accessToken.length).toBeGreaterThan(0);
      expect(latest.expiresAt!.getTime()).toBeGreaterThan(Date.now());
      watcher.close();
      expect(oidc.counters.reuses).toBe(0);
    } finally {
      client.close();
      await broker.stop();
    }
  });
});
