/**
 * Issue 12, items 5 and 6: Enroll is all or nothing, and Revoke says whether the IdP revoked the
 * refresh token. A real oidc-provider in-process, real gRPC with TLS and caller authentication,
 * state and locks on real redis-server processes.
 */
import * as grpc from '@grpc/grpc-js';
import { pino, type Logger } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, rpcError } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

let oidc: OidcProviderHarness;
let redis: RedisNodes;

beforeAll(async () => {
  [oidc, redis] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 30 }),
    startRedisNodes(4),
  ]);
});
afterAll(async () => {
  await Promise.all([oidc?.close(), redis?.stopAll()]);
});

function capturingLogger(): { log: Logger; lines: () => Record<string, unknown>[] } {
  const raw: string[] = [];
  const log = pino({ level: 'info' }, { write: (line: string) => raw.push(line) });
  return { log, lines: () => raw.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

/** Waits (bounded) until `predicate` holds. */
async function until(predicate: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('Enroll is all or nothing', () => {
  it('wrong client credentials: FAILED_PRECONDITION naming the broker client, nothing created', async () => {
    const topology = redisTopology(redis.urls);
    const wrongSecret = await startInProcessBroker(
      brokerEnv(oidc, topology, { TB_IDP_CLIENT_SECRET: 'not-the-client-secret' }),
    );
    const wrongMethod = await startInProcessBroker(
      brokerEnv(oidc, topology, { TB_IDP_AUTH_METHOD: 'none', TB_IDP_CLIENT_SECRET: '' }),
    );
    const good = await startInProcessBroker(brokerEnv(oidc, topology));
    const clients = [wrongSecret, wrongMethod, good].map((b) => new BrokerClient(b.address));
    const [viaWrongSecret, viaWrongMethod, viaGood] = clients as [
      BrokerClient,
      BrokerClient,
      BrokerClient,
    ];
    try {
      const minted = await oidc.mintTokens('carol');
      for (const client of [viaWrongSecret, viaWrongMethod]) {
        const err = await rpcError(client.enroll('diku', 'carol', minted.refresh_token));
        expect(err.code).toBe(grpc.status.FAILED_PRECONDITION);
        expect(err.metadata.get('tb-error-code')).toEqual(['BROKER_CLIENT_REJECTED']);
        expect(err.details).toContain("rejected the broker's own client configuration");
        expect(err.details).toContain('invalid_client');
        expect(err.details).toContain('TB_IDP_CLIENT_SECRET');
        expect(err.details).toContain('no session was created or changed');
        expect(err.details.includes(minted.refresh_token)).toBe(false);
        // Nothing was created: not found (the sidecar answers 404), and not listed.
        const read = await rpcError(viaGood.getToken('diku', 'carol'));
        expect(read.code).toBe(grpc.status.NOT_FOUND);
        expect((await viaGood.list('diku')).sessions).toEqual([]);
      }
      // The caller's token was never consumed: a correctly configured broker enrolls it.
      const enrolled = (await viaGood.enroll('diku', 'carol', minted.refresh_token)).session!;
      expect(enrolled.generation).toBe(1);
      expect(enrolled.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(oidc.counters.reuses).toBe(0);
    } finally {
      for (const client of clients) client.close();
      await Promise.all([wrongSecret.stop(), wrongMethod.stop(), good.stop()]);
    }
  });

  it('a garbage refresh token: INVALID_ARGUMENT for the caller, no session (404, not 409)', async () => {
    const broker = await startInProcessBroker(brokerEnv(oidc, redisTopology(redis.urls)));
    const client = new BrokerClient(broker.address);
    try {
      const err = await rpcError(client.enroll('diku', 'nobody', 'garbage-refresh-token-0001'));
      expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(err.details).toMatch(/^refresh_token was rejected by identity provider "default"/);
      expect(err.details).toContain('invalid_grant');
      expect(err.details).not.toContain('garbage-refresh-token-0001');
      expect((await rpcError(client.getToken('diku', 'nobody'))).code).toBe(grpc.status.NOT_FOUND);
      expect((await client.list('diku')).sessions).toEqual([]);
    } finally {
      client.close();
      await broker.stop();
    }
  });

  it('a failed re-enrollment leaves the old session exactly as it was, still serving', async () => {
    const topology = redisTopology(redis.urls);
    const broker = await startInProcessBroker(brokerEnv(oidc, topology));
    const misconfigured = await startInProcessBroker(
      brokerEnv(oidc, topology, { TB_IDP_CLIENT_SECRET: 'not-the-client-secret' }),
    );
    const client = new BrokerClient(broker.address);
    const other = new BrokerClient(misconfigured.address);
    const watcher = client.watch();
    try {
      const minted = await oidc.mintTokens('dora');
      await client.enroll('diku', 'dora', minted.refresh_token);
      const before = (await client.list('diku')).sessions[0]!;
      const token = (await client.getToken('diku', 'dora')).token!;
      watcher.subscribe('diku', 'dora');
      await watcher.until(() => watcher.latest('diku', 'dora')?.generation === before.generation);

      const garbage = await rpcError(client.enroll('diku', 'dora', 'garbage-refresh-token-0002'));
      expect(garbage.code).toBe(grpc.status.INVALID_ARGUMENT);
      const fresh = await oidc.mintTokens('dora');
      const refused = await rpcError(other.enroll('diku', 'dora', fresh.refresh_token));
      expect(refused.code).toBe(grpc.status.FAILED_PRECONDITION);

      // Exactly as it was: same metadata (generation, family, times), same token, no event.
      const after = (await client.list('diku')).sessions[0]!;
      expect({ ...after, lastUsedAt: undefined }).toEqual({ ...before, lastUsedAt: undefined });
      const again = (await client.getToken('diku', 'dora')).token!;
      expect(again.generation).toBe(token.generation);
      expect(again.accessToken === token.accessToken).toBe(true);
      expect(watcher.of('diku', 'dora').map((e) => e.generation)).toEqual([before.generation]);
      // And still serving: its own family still rotates.
      const refreshed = (await client.refresh('diku', 'dora', token.generation)).token!;
      expect(refreshed.generation).toBe(token.generation + 1);
      expect(refreshed.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(oidc.counters.reuses).toBe(0);
    } finally {
      watcher.close();
      client.close();
      other.close();
      await Promise.all([broker.stop(), misconfigured.stop()]);
    }
  });
});

describe('Revoke reports what the IdP did', () => {
  it('without a revocation endpoint: idp_revoked false, why, a start-up warning and a log line', async () => {
    const { log, lines } = capturingLogger();
    const broker = await startInProcessBroker(
      brokerEnv(oidc, redisTopology(redis.urls), { TB_IDP_REVOCATION_ENDPOINT: '' }),
      log,
    );
    const client = new BrokerClient(broker.address);
    try {
      const noEndpoint = (l: Record<string, unknown>) =>
        l.idp === 'default' && String(l.msg).includes('has no revocation endpoint');
      await until(() => lines().some(noEndpoint), 'the start-up warning');
      expect(lines().filter(noEndpoint)).toHaveLength(1);
      expect(lines().find(noEndpoint)?.level).toBe(40);

      const minted = await oidc.mintTokens('erin');
      await client.enroll('diku', 'erin', minted.refresh_token);
      const revocations = oidc.counters.revocations;
      const res = await client.revoke('diku', 'erin');
      expect(res.session?.status).toBe(SessionStatus.SESSION_STATUS_REVOKED);
      expect(res.idpRevoked).toBe(false);
      expect(res.idpRevokeProblem).toBe('no revocation endpoint');
      expect(oidc.counters.revocations).toBe(revocations);
      const logged = lines().find((l) => l.tenant === 'diku' && l.idpRevoked === false);
      expect(logged?.problem).toBe('no revocation endpoint');
      expect(String(logged?.msg)).toContain('NOT at the IdP');

      const twice = await client.revoke('diku', 'erin');
      expect(twice.idpRevoked).toBe(false);
      expect(twice.idpRevokeProblem).toMatch(/^already revoked/);
    } finally {
      client.close();
      await broker.stop();
    }
  });

  it('with one: idp_revoked true, the IdP counted the revocation, no start-up warning', async () => {
    const { log, lines } = capturingLogger();
    const broker = await startInProcessBroker(brokerEnv(oidc, redisTopology(redis.urls)), log);
    const client = new BrokerClient(broker.address);
    try {
      const minted = await oidc.mintTokens('fred');
      await client.enroll('diku', 'fred', minted.refresh_token);
      const revocations = oidc.counters.revocations;
      const res = await client.revoke('diku', 'fred');
      expect(res.idpRevoked).toBe(true);
      expect(res.idpRevokeProblem).toBe('');
      expect(oidc.counters.revocations).toBe(revocations + 1);
      expect(lines().some((l) => String(l.msg).includes('revocation endpoint'))).toBe(false);
      expect(lines().some((l) => l.tenant === 'diku' && l.idpRevoked === true)).toBe(true);
    } finally {
      client.close();
      await broker.stop();
    }
  });
});
