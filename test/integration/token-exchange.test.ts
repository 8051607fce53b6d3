/**
 * Enrollment by RFC 8693 token exchange against the real in-process OIDC provider with its
 * token-exchange grant registered: the broker trades the user's access token for a family issued
 * to its own client, so the user's refresh token is never presented by the broker, stays usable,
 * and a browser logout (revoking the user's grant) does not end the broker's family.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  SessionStatus,
  type EnrollRequest,
  type EnrollResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, rpcError } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const TENANT = 'diku';

let oidc: OidcProviderHarness;
let redis: RedisNodes;

beforeAll(async () => {
  [oidc, redis] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 2, tokenExchange: true }),
    startRedisNodes(4),
  ]);
});
afterAll(async () => {
  await Promise.all([oidc?.close(), redis?.stopAll()]);
});

function enroll(client: BrokerClient, request: EnrollRequest): Promise<EnrollResponse> {
  return new Promise((resolve, reject) =>
    client.raw.enroll(request, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

function exchangeRequest(user: string, subjectToken: string): EnrollRequest {
  return {
    tenant: TENANT,
    user,
    idp: '',
    credential: { $case: 'tokenExchange', value: { subjectToken, subjectTokenType: '' } },
  };
}

describe('enrollment by token exchange (RFC 8693)', () => {
  it("gives the broker a family of its own and leaves the user's refresh token usable", async () => {
    const broker = await startInProcessBroker(
      brokerEnv(oidc, redisTopology(redis.urls), { TB_REFRESH_RATIO: '0.5' }),
    );
    const client = new BrokerClient(broker.address);
    const watcher = client.watch();
    try {
      // The browser's own family, issued to the application's client (`post`).
      const browser = await oidc.mintTokens('alice', 'post');
      const before = { ...oidc.counters };

      const session = (await enroll(client, exchangeRequest('alice', browser.access_token)))
        .session!;
      expect(session.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(session.generation).toBe(1);
      expect(oidc.counters.exchanges - before.exchanges).toBe(1);
      // The broker's family is new and its own: the enrollment refreshed nothing.
      expect(oidc.counters.refreshes - before.refreshes).toBe(0);
      expect(oidc.presentationsOf(browser.refresh_token)).toBe(0);
      const first = (await client.getToken(TENANT, 'alice')).token!;
      expect(first.accessToken === browser.access_token).toBe(false);

      // The broker rotates its family on its own schedule.
      watcher.subscribe(TENANT, 'alice');
      await watcher.until(
        () => (watcher.latest(TENANT, 'alice')?.generation ?? 0) >= 3,
        8_000,
        'two rotations of the exchanged family',
      );

      // The user's own refresh token still works: the broker never presented it.
      const refreshed = await oidc.postToken(
        { grant_type: 'refresh_token', refresh_token: browser.refresh_token },
        'post',
      );
      expect(refreshed.status).toBe(200);
      const browserNext = (await refreshed.json()) as { refresh_token: string };
      expect(oidc.presentationsOf(browser.refresh_token)).toBe(1);

      // The browser logs out: its grant is revoked, and its refresh token is dead.
      const revoked = await fetch(oidc.revocationEndpoint, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({
          token: browserNext.refresh_token,
          token_type_hint: 'refresh_token',
          client_id: oidc.clients.post.clientId,
          client_secret: oidc.clients.post.clientSecret,
        }),
      });
      expect(revoked.status).toBe(200);
      const afterLogout = await oidc.postToken(
        { grant_type: 'refresh_token', refresh_token: browserNext.refresh_token },
        'post',
      );
      expect(afterLogout.status).toBe(400);
      expect(((await afterLogout.json()) as { error: string }).error).toBe('invalid_grant');

      // The broker's family lives on: two more generations after the logout, all ACTIVE.
      const atLogout = watcher.latest(TENANT, 'alice')!.generation;
      await watcher.until(
        () => (watcher.latest(TENANT, 'alice')?.generation ?? 0) >= atLogout + 2,
        8_000,
        'rotations after the browser logout',
      );
      const events = watcher.of(TENANT, 'alice');
      expect(events.every((e) => e.status === SessionStatus.SESSION_STATUS_ACTIVE)).toBe(true);
      for (let i = 1; i < events.length; i++)
        expect(events[i]!.generation).toBeGreaterThan(events[i - 1]!.generation);
      expect(oidc.counters.reuses - before.reuses).toBe(0);
      // The only refused refresh was the browser's own, after its logout.
      expect(oidc.counters.invalidGrants - before.invalidGrants).toBe(1);
      const latest = (await client.getToken(TENANT, 'alice')).token!;
      expect(latest.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(latest.accessToken).not.toBe('');
    } finally {
      watcher.close();
      client.close();
      await broker.stop();
    }
  });

  it('refuses a subject token the IdP does not accept, and an IdP without the grant', async () => {
    const broker = await startInProcessBroker(brokerEnv(oidc, redisTopology(redis.urls)));
    const noExchange = await startOidcProvider({ accessTokenTtlSeconds: 60 });
    const plain = await startInProcessBroker(brokerEnv(noExchange));
    const client = new BrokerClient(broker.address);
    const plainClient = new BrokerClient(plain.address);
    try {
      const bogus = await rpcError(enroll(client, exchangeRequest('bob', 'not-a-token-0001')));
      // The caller's subject token is the bad argument (issue 12): INVALID_ARGUMENT, naming it.
      expect(bogus.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(bogus.details).toMatch(/^token_exchange\.subject_token was rejected .*invalid_grant/);
      expect(bogus.details).not.toContain('not-a-token-0001');
      expect((await rpcError(client.getToken(TENANT, 'bob'))).code).toBe(grpc.status.NOT_FOUND);

      const empty = await rpcError(enroll(client, exchangeRequest('bob', '')));
      expect(empty.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(empty.details).toBe('token_exchange.subject_token is required');

      const user = await noExchange.mintTokens('carol', 'post');
      const refused = await rpcError(
        enroll(plainClient, exchangeRequest('carol', user.access_token)),
      );
      // The broker's client may not exchange: its configuration, not the caller's token.
      expect(refused.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(refused.metadata.get('tb-error-code')).toEqual(['BROKER_CLIENT_REJECTED']);
      expect(refused.details).toContain("rejected the broker's own client configuration");
      expect((await rpcError(plainClient.getToken(TENANT, 'carol'))).code).toBe(
        grpc.status.NOT_FOUND,
      );
    } finally {
      client.close();
      plainClient.close();
      await Promise.all([broker.stop(), plain.stop()]);
      await noExchange.close();
    }
  });
});
