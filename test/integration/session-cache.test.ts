/**
 * GetToken served from a replica's in-memory copy (broker/session-cache.ts) is never staler than
 * the last event: two broker replicas on real redis-server processes (state on one node, Redlock
 * on the others), a real oidc-provider, real gRPC with TLS and caller authentication. A rotation
 * or revocation on replica A is what replica B answers next; with B's event connection gone, B
 * does not answer from its copy.
 */
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BrokerClient, rpcError } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

let oidc: OidcProviderHarness;
let redis: RedisNodes;

beforeAll(async () => {
  [oidc, redis] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 60 }),
    startRedisNodes(3),
  ]);
});
afterAll(async () => {
  await Promise.all([oidc?.close(), redis?.stopAll()]);
});

/** Waits (bounded) until `predicate` holds. */
async function until(predicate: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function twoReplicas(env: Record<string, string>) {
  const lines: Record<string, unknown>[] = [];
  const logB = pino(
    { level: 'warn' },
    { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) },
  );
  const a = await startInProcessBroker(env);
  const b = await startInProcessBroker(env, logB);
  const viaA = new BrokerClient(a.address);
  const viaB = new BrokerClient(b.address);
  return {
    a,
    b,
    viaA,
    viaB,
    logsB: lines,
    stop: async () => {
      viaA.close();
      viaB.close();
      await Promise.all([a.stop(), b.stop()]);
    },
  };
}

describe('GetToken from memory across replicas', () => {
  it("answers replica A's rotation and revocation on replica B at once", async () => {
    const r = await twoReplicas(brokerEnv(oidc, redisTopology(redis.urls)));
    try {
      await r.viaA.enroll('diku', 'ann', (await oidc.mintTokens('ann')).refresh_token);
      const first = (await r.viaB.getToken('diku', 'ann')).token!;
      const hitsBefore = await r.b.metrics.value('tb_broker_token_reads', { result: 'hit' });
      for (let i = 0; i < 3; i++)
        expect((await r.viaB.getToken('diku', 'ann')).token!.generation).toBe(first.generation);
      // B answers from its copy now (it would not notice a missed event otherwise).
      expect(await r.b.metrics.value('tb_broker_token_reads', { result: 'hit' })).toBe(
        hitsBefore + 3,
      );

      for (let round = 0; round < 3; round++) {
        const current = (await r.viaB.getToken('diku', 'ann')).token!;
        const rotated = (await r.viaA.refresh('diku', 'ann', current.generation)).token!;
        expect(rotated.generation).toBeGreaterThan(current.generation);
        const seen = (await r.viaB.getToken('diku', 'ann')).token!;
        expect(seen.generation).toBe(rotated.generation);
        expect(seen.accessToken).toBe(rotated.accessToken);
        // And A, whose own commit it was, too.
        expect((await r.viaA.getToken('diku', 'ann')).token!.generation).toBe(rotated.generation);
      }

      await r.viaA.revoke('diku', 'ann');
      const err = await rpcError(r.viaB.getToken('diku', 'ann'));
      expect(err.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(err.metadata.get('tb-error-code')).toEqual(['SESSION_INACTIVE']);
      expect(oidc.counters.reuses).toBe(0);
    } finally {
      await r.stop();
    }
  });

  it('re-enrolls on a replica that never saw the session: the generation keeps rising', async () => {
    const r = await twoReplicas(brokerEnv(oidc, redisTopology(redis.urls)));
    try {
      const first = (
        await r.viaA.enroll('diku', 'cid', (await oidc.mintTokens('cid')).refresh_token)
      ).session!;
      // B tries the write as a new session first; it exists, so B reads it and replaces its family.
      const again = (
        await r.viaB.enroll('diku', 'cid', (await oidc.mintTokens('cid-2')).refresh_token)
      ).session!;
      expect(again.generation).toBeGreaterThan(first.generation);
      expect(again.epoch).not.toBe(first.epoch);
      const read = (await r.viaA.getToken('diku', 'cid')).token!;
      expect(read.generation).toBe(again.generation);
      expect(read.epoch).toBe(again.epoch);
      expect((await r.viaA.list('diku')).sessions.filter((x) => x.user === 'cid')).toHaveLength(1);
      expect(oidc.counters.reuses).toBe(0);
    } finally {
      await r.stop();
    }
  });

  it('does not answer from memory while its event connection is down', async () => {
    const topology = redisTopology(redis.urls);
    const r = await twoReplicas(brokerEnv(oidc, topology));
    const state = redis.nodes[0]!;
    try {
      await r.viaA.enroll('diku', 'bea', (await oidc.mintTokens('bea')).refresh_token);
      const before = (await r.viaB.getToken('diku', 'bea')).token!;
      expect((await r.viaB.getToken('diku', 'bea')).token!.generation).toBe(before.generation);

      // The state node dies: B's event connection closes and its reconnects fail (logged).
      await state.kill();
      await until(
        () => r.logsB.some((l) => l.msg === 'events error'),
        "B's events connection to fail",
      );
      // B cannot read the state, and it does not fall back to its copy of the session.
      const err = await rpcError(r.viaB.getToken('diku', 'bea'));
      expect(err.code).toBe(grpc.status.UNAVAILABLE);

      // The node comes back empty; the session is enrolled again (a new epoch, generation 1).
      await state.restart();
      let again: Awaited<ReturnType<BrokerClient['enroll']>> | undefined;
      const deadline = Date.now() + 10_000;
      while (!again) {
        try {
          again = await r.viaA.enroll(
            'diku',
            'bea',
            (await oidc.mintTokens('bea-2')).refresh_token,
          );
        } catch (e) {
          if (Date.now() > deadline) throw e;
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
      }
      expect(again.session!.epoch).not.toBe(before.epoch);
      // B serves the new family, not its old copy (whose generation was higher).
      let seen = await r.viaB.getToken('diku', 'bea').catch(() => undefined);
      const readDeadline = Date.now() + 10_000;
      while (!seen && Date.now() < readDeadline) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        seen = await r.viaB.getToken('diku', 'bea').catch(() => undefined);
      }
      expect(seen?.token?.epoch).toBe(again.session!.epoch);
      expect(seen?.token?.generation).toBe(again.session!.generation);
    } finally {
      await r.stop();
    }
  });
});
