import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, rpcError } from '../../scripts/dev/broker-client.js';
import { brokerEnv, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';

/** Access tokens live 2 s: with TB_REFRESH_RATIO 0.5 a session rotates about every second. */
let oidc: OidcProviderHarness;

beforeAll(async () => {
  oidc = await startOidcProvider({ accessTokenTtlSeconds: 2 });
});
afterAll(async () => {
  await oidc?.close();
});

describe('embedded mode (no TB_REDIS_URL)', () => {
  it('rotates, streams, turns invalid_grant into REAUTH_REQUIRED and revokes', async () => {
    const logLines: string[] = [];
    const log = pino({ level: 'debug' }, { write: (line: string) => logLines.push(line) });
    const broker = await startInProcessBroker(
      brokerEnv(oidc, undefined, { TB_REFRESH_RATIO: '0.5', TB_LOG_LEVEL: 'debug' }),
      log,
    );
    const client = new BrokerClient(broker.address);
    const watcher = client.watch();
    const seen = new Set<string>();
    try {
      expect(logLines.some((l) => l.includes('EMBEDDED MODE') && l.includes('"level":40'))).toBe(
        true,
      );
      const alice = await oidc.mintTokens('embedded-alice');
      const bob = await oidc.mintTokens('embedded-bob');
      for (const t of [alice, bob]) seen.add(t.refresh_token).add(t.access_token);
      const enrolled = (await client.enroll('diku', 'alice', alice.refresh_token)).session!;
      expect(enrolled.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(oidc.presentationsOf(alice.refresh_token)).toBe(1);
      await client.enroll('diku', 'bob', bob.refresh_token);
      watcher.subscribe('diku', 'alice');
      watcher.subscribe('diku', 'bob');

      // Generations arrive in increasing order, each with a new access token.
      await watcher.until(
        () => (watcher.latest('diku', 'alice')?.generation ?? 0) >= enrolled.generation + 3,
        8_000,
        'three rotations',
      );
      const events = watcher.of('diku', 'alice');
      for (const e of events) seen.add(e.accessToken);
      for (let i = 1; i < events.length; i++) {
        expect(events[i]!.generation).toBeGreaterThan(events[i - 1]!.generation);
        expect(events[i]!.accessToken === events[i - 1]!.accessToken).toBe(false);
      }
      expect(events.every((e) => e.status === SessionStatus.SESSION_STATUS_ACTIVE)).toBe(true);
      expect(oidc.counters.reuses).toBe(0);

      // The family dies at the IdP: the next due rotation makes it REAUTH_REQUIRED.
      await oidc.revokeGrantOf('embedded-bob');
      await watcher.until(
        () =>
          watcher.latest('diku', 'bob')?.status === SessionStatus.SESSION_STATUS_REAUTH_REQUIRED,
        5_000,
        'REAUTH_REQUIRED',
      );
      expect(watcher.latest('diku', 'bob')!.accessToken).toBe('');
      expect(watcher.latest('diku', 'bob')!.errorCode).toBe('IDP_INVALID_GRANT');
      expect((await rpcError(client.getToken('diku', 'bob'))).code).toBe(
        grpc.status.FAILED_PRECONDITION,
      );

      // Revoke: REVOKED to the watcher, RFC 7009 at the IdP, and no refresh afterwards.
      const revocations = oidc.counters.revocations;
      const revoked = (await client.revoke('diku', 'alice')).session!;
      const requests = oidc.counters.refreshRequests;
      expect(oidc.counters.revocations).toBe(revocations + 1);
      await watcher.until(
        () => watcher.latest('diku', 'alice')?.status === SessionStatus.SESSION_STATUS_REVOKED,
      );
      expect(watcher.latest('diku', 'alice')!.generation).toBe(revoked.generation);
      expect(watcher.latest('diku', 'alice')!.accessToken).toBe('');
      expect((await rpcError(client.getToken('diku', 'alice'))).code).toBe(
        grpc.status.FAILED_PRECONDITION,
      );
      await new Promise((resolve) => setTimeout(resolve, 1_500));
      expect(oidc.counters.refreshRequests).toBe(requests);

      // Nothing above put a token into a log line.
      for (const e of watcher.of('diku', 'bob')) seen.add(e.accessToken);
      seen.delete('');
      const logs = logLines.join('');
      expect([...seen].filter((token) => logs.includes(token)).length).toBe(0);
    } finally {
      watcher.close();
      client.close();
      await broker.stop();
    }
  });
});
