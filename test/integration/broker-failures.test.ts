import * as grpc from '@grpc/grpc-js';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { startBroker, type RunningBroker } from '../../broker/broker-app.js';
import { loadConfig } from '../../broker/config.js';
import { BrokerGrpcServer } from '../../broker/grpc/grpc-server.js';
import type {
  IdpAdapter,
  IdpContext,
  RevokeOutcome,
  TokenSet,
} from '../../broker/idp/idp-adapter.js';
import { OAuth2Adapter } from '../../broker/idp/oauth2-adapter.js';
import { MemoryLockService } from '../../broker/lock/memory-lock-service.js';
import { RotationPolicy } from '../../broker/rotation/rotation-policy.js';
import { BrokerMetrics } from '../../broker/broker-metrics.js';
import { MetricSnapshot } from '../../shared/telemetry/metric-snapshot.js';
import { Rotator } from '../../broker/rotation/rotator.js';
import { SessionService } from '../../broker/session-service.js';
import { KeySpace } from '../../broker/store/keys.js';
import type { Transition } from '../../broker/session-transitions.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';
import { WatchHub } from '../../broker/watch-hub.js';
import { SessionStatus, type TokenEvent } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, eventually, rpcError } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const silent = pino({ level: 'silent' });

/** Access tokens live a minute: nothing rotates on its own during a test. */
let steady: OidcProviderHarness;
/** Access tokens live 2 s: sessions rotate about every second with TB_REFRESH_RATIO 0.5. */
let fast: OidcProviderHarness;
let redis: RedisNodes;

beforeAll(async () => {
  [steady, fast, redis] = await Promise.all([
    startOidcProvider({ accessTokenTtlSeconds: 60 }),
    startOidcProvider({ accessTokenTtlSeconds: 2 }),
    startRedisNodes(4),
  ]);
});
afterAll(async () => {
  await Promise.all([steady?.close(), fast?.close(), redis?.stopAll()]);
});

/** Node 0 holds state, nodes 1-3 are the Redlock nodes; a fresh key prefix per call. */
const freshTopology = () => redisTopology(redis.urls);

interface IdpCall {
  at: number;
  presented: string;
  /** 'pending', 'ok' or the error code. */
  outcome: string;
  /** The error's message (never holds a token value). */
  message?: string;
  tokens?: TokenSet;
}

/** Wraps the real adapter and keeps every refresh (tokens stay in memory, never printed). */
class RecordingIdp implements IdpAdapter {
  readonly calls: IdpCall[] = [];
  readonly name: string;

  constructor(private readonly inner: IdpAdapter) {
    this.name = inner.name;
  }

  async refresh(refreshToken: string, signal: AbortSignal, context: IdpContext): Promise<TokenSet> {
    const call: IdpCall = { at: Date.now(), presented: refreshToken, outcome: 'pending' };
    this.calls.push(call);
    try {
      call.tokens = await this.inner.refresh(refreshToken, signal, context);
      call.outcome = 'ok';
      return call.tokens;
    } catch (err) {
      call.outcome = (err as { code?: string }).code ?? 'error';
      call.message = err instanceof Error ? err.message : String(err);
      throw err;
    }
  }

  revoke(refreshToken: string, signal: AbortSignal, context: IdpContext): Promise<RevokeOutcome> {
    return this.inner.revoke(refreshToken, signal, context);
  }

  /** Calls that presented a refresh token of the family that started with `first`. */
  familyCalls(first: string): IdpCall[] {
    const family = new Set([first]);
    const calls: IdpCall[] = [];
    for (const call of this.calls) {
      if (!family.has(call.presented)) continue;
      calls.push(call);
      if (call.tokens?.refreshToken) family.add(call.tokens.refreshToken);
    }
    return calls;
  }

  /** Every token value the IdP handed out. */
  tokenValues(): string[] {
    return this.calls.flatMap((c) =>
      c.tokens ? [c.tokens.accessToken, c.tokens.refreshToken ?? ''].filter(Boolean) : [],
    );
  }
}

function oauth2For(oidc: OidcProviderHarness, timeoutMs = 2_000): OAuth2Adapter {
  return new OAuth2Adapter({
    name: 'default',
    tokenEndpoint: oidc.tokenEndpoint,
    revocationEndpoint: oidc.revocationEndpoint,
    clientId: oidc.clients.basic.clientId,
    clientSecret: oidc.clients.basic.clientSecret,
    authMethod: 'client_secret_basic',
    timeoutMs,
  });
}

type TestBroker = RunningBroker & {
  address: string;
  idp: RecordingIdp;
  client: BrokerClient;
  metrics: MetricSnapshot;
};

const running: TestBroker[] = [];

/** An in-process broker (real gRPC, real Redis) whose IdP calls are recorded. */
async function startTestBroker(
  oidc: OidcProviderHarness,
  topology: ReturnType<typeof redisTopology>,
  extra: Record<string, string> = {},
): Promise<TestBroker> {
  const config = loadConfig(brokerEnv(oidc, topology, extra));
  const idp = new RecordingIdp(oauth2For(oidc, config.idp.timeoutMs));
  const metrics = new MetricSnapshot();
  const broker = await startBroker(config, silent, {
    idps: new Map([[config.idp.name, idp]]),
    meter: metrics.meter,
  });
  const address = `127.0.0.1:${broker.port}`;
  const started = Object.assign(broker, {
    address,
    idp,
    client: new BrokerClient(address),
    metrics,
  });
  running.push(started);
  return started;
}

async function stopAll(): Promise<void> {
  const brokers = running.splice(0);
  for (const broker of brokers) broker.client.close();
  await Promise.all(brokers.map((b) => b.stop()));
}

/** How many of `tokens` occur in `text`, raw or base64/base64url-encoded. */
function leakCount(text: string, tokens: Iterable<string>): number {
  let count = 0;
  for (const token of tokens) {
    const forms = [
      token,
      Buffer.from(token).toString('base64url'),
      Buffer.from(token).toString('base64'),
    ];
    if (forms.some((form) => text.includes(form))) count++;
  }
  return count;
}

/** Every key of a Redis node with every value of every type, as text. */
async function dumpNode(url: string): Promise<Map<string, string>> {
  const client = new Redis(url);
  const out = new Map<string, string>();
  try {
    let cursor = '0';
    do {
      const [next, keys] = await client.scan(cursor, 'COUNT', 1000);
      cursor = next;
      for (const key of keys) {
        const type = await client.type(key);
        let parts: string[];
        switch (type) {
          case 'string':
            parts = [(await client.get(key)) ?? ''];
            break;
          case 'hash':
            parts = Object.entries(await client.hgetall(key)).flat();
            break;
          case 'zset':
            parts = await client.zrange(key, '0', '-1', 'WITHSCORES');
            break;
          case 'set':
            parts = await client.smembers(key);
            break;
          case 'list':
            parts = await client.lrange(key, 0, -1);
            break;
          case 'stream':
            parts = (await client.xrange(key, '-', '+')).flat(3);
            break;
          case 'none':
            continue; // expired between SCAN and TYPE
          default:
            throw new Error(`unexpected Redis type ${type} at ${key}`);
        }
        out.set(key, [key, ...parts].join('\n'));
      }
    } while (cursor !== '0');
  } finally {
    client.disconnect();
  }
  return out;
}

const ms = (date: Date | undefined): number => date?.getTime() ?? 0;
const sleep = (millis: number) => new Promise((resolve) => setTimeout(resolve, millis));

describe('broker failure handling (Redis state, 3 lock nodes, real OIDC provider)', () => {
  afterAll(stopAll);

  it('rides out an IdP outage past the due time on the current token, with backoff', async () => {
    const oidc = await startOidcProvider({ accessTokenTtlSeconds: 8 });
    try {
      const broker = await startTestBroker(oidc, freshTopology(), { TB_REFRESH_RATIO: '0.5' });
      const { client } = broker;
      const minted = await oidc.mintTokens('outage');
      const session = (await client.enroll('diku', 'outage', minted.refresh_token)).session!;
      const due = ms(session.nextRefreshAt);
      const expiresAt = ms(session.accessTokenExpiresAt);
      expect(due).toBeGreaterThan(Date.now());
      expect(expiresAt - due).toBeGreaterThan(3_000);
      const before = (await client.getToken('diku', 'outage')).token!;
      const watcher = client.watch();
      watcher.subscribe('diku', 'outage');
      const callsAtEnroll = broker.idp.calls.length;
      const faultsBefore = oidc.counters.faultsInjected;

      // 503 with Retry-After first, then connection refused, until well past the due time.
      oidc.setFault({ kind: 'status', status: 503, retryAfterSeconds: 1 });
      const holdsCurrentToken = async (until: number) => {
        while (Date.now() < until) {
          const token = (await client.getToken('diku', 'outage')).token!;
          expect(token.generation).toBe(session.generation);
          expect(token.accessToken === before.accessToken).toBe(true);
          expect(ms(token.expiresAt)).toBeGreaterThan(Date.now());
          await sleep(200);
        }
      };
      await holdsCurrentToken(due + 700);
      oidc.setFault({ kind: 'none' });
      await oidc.stopListening();
      await holdsCurrentToken(due + 1_600);
      const outage = broker.idp.calls.slice(callsAtEnroll);
      await eventually(() => outage.every((c) => c.outcome !== 'pending'));
      await oidc.resumeListening();

      expect(outage.length).toBeGreaterThanOrEqual(2);
      expect(outage.length).toBeLessThan(15);
      expect(outage.every((c) => c.outcome === 'IDP_UNAVAILABLE')).toBe(true);
      expect(outage[0]!.at).toBeGreaterThanOrEqual(due - 100);
      expect(oidc.counters.faultsInjected - faultsBefore).toBeGreaterThanOrEqual(1);
      // Retry-After: 1 is honoured after a 503; every retry backs off, none spins.
      const answered503 = outage.findIndex((c) => c.message?.includes('HTTP 503'));
      expect(answered503).toBeGreaterThanOrEqual(0);
      expect(answered503).toBeLessThan(outage.length - 1);
      expect(outage[answered503 + 1]!.at - outage[answered503]!.at).toBeGreaterThanOrEqual(950);
      for (let i = 1; i < outage.length; i++)
        expect(outage[i]!.at - outage[i - 1]!.at).toBeGreaterThanOrEqual(90);
      expect(
        await broker.metrics.value('tb_broker_rotations', { outcome: 'retry-scheduled' }),
      ).toBeGreaterThanOrEqual(2);

      // The IdP is back: the next retry rotates, before the old token expires.
      await watcher.until(
        () => (watcher.latest('diku', 'outage')?.generation ?? 0) > session.generation,
        expiresAt - Date.now(),
        'a rotation after the outage',
      );
      const rotated = watcher.latest('diku', 'outage')!;
      expect(rotated.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(rotated.accessToken.length).toBeGreaterThan(0);
      expect(rotated.accessToken === before.accessToken).toBe(false);
      expect(rotated.errorCode).toBe('');
      expect(Date.now()).toBeLessThan(expiresAt);
      const listed = (await client.list('diku')).sessions[0]!;
      expect(listed.failedAttempts).toBe(0);
      expect(oidc.counters.reuses).toBe(0);
      watcher.close();
    } finally {
      await stopAll();
      await oidc.close();
    }
  });

  it('turns invalid_grant into REAUTH_REQUIRED for every watcher, without retrying', async () => {
    const broker = await startTestBroker(steady, freshTopology());
    const { client } = broker;
    const minted = await steady.mintTokens('reauth');
    const session = (await client.enroll('diku', 'reauth', minted.refresh_token)).session!;
    const watcher = client.watch();
    watcher.subscribe('diku', 'reauth');
    await watcher.until(() => watcher.latest('diku', 'reauth')?.generation === session.generation);

    expect(await steady.revokeGrantOf('reauth')).toBe(1);
    const refreshError = await rpcError(client.refresh('diku', 'reauth', session.generation));
    expect(refreshError.code).toBe(grpc.status.FAILED_PRECONDITION);

    await watcher.until(
      () =>
        watcher.latest('diku', 'reauth')?.status === SessionStatus.SESSION_STATUS_REAUTH_REQUIRED,
    );
    const event = watcher.latest('diku', 'reauth')!;
    expect(event.accessToken).toBe('');
    expect(event.generation).toBe(session.generation + 1);
    expect(event.errorCode).toBe('IDP_INVALID_GRANT');
    const listed = (await client.list('diku')).sessions.find((s) => s.user === 'reauth')!;
    expect(listed.status).toBe(SessionStatus.SESSION_STATUS_REAUTH_REQUIRED);
    expect(listed.lastErrorCode).toBe('IDP_INVALID_GRANT');
    expect(listed.nextRefreshAt).toBeUndefined();
    const getError = await rpcError(client.getToken('diku', 'reauth'));
    expect(getError.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(getError.details).not.toContain(minted.refresh_token);

    // Terminal: no retries reach the IdP afterwards.
    const requests = steady.counters.refreshRequests;
    const calls = broker.idp.calls.length;
    await sleep(2_500);
    expect(steady.counters.refreshRequests).toBe(requests);
    expect(broker.idp.calls.length).toBe(calls);
    expect(await broker.metrics.value('tb_broker_rotations', { outcome: 'reauth-required' })).toBe(
      1,
    );
    expect(await broker.metrics.value('tb_broker_rotations', { outcome: 'retry-scheduled' })).toBe(
      0,
    );
    watcher.close();
    await stopAll();
  });

  it('keeps no token in plain text, base64 or base64url anywhere in Redis', async () => {
    const topology = freshTopology();
    const broker = await startTestBroker(fast, topology, { TB_REFRESH_RATIO: '0.5' });
    const { client } = broker;
    const published: string[] = [];
    const subscriber = new Redis(topology.state);
    subscriber.on('pmessage', (_pattern: string, channel: string, message: string) =>
      published.push(`${channel}\n${message}`),
    );
    await subscriber.psubscribe('*');
    const seen = new Set<string>();
    const users = ['plain-a', 'plain-b', 'plain-c'];
    const watcher = client.watch();
    try {
      for (const user of users) {
        const minted = await fast.mintTokens(user);
        seen.add(minted.refresh_token).add(minted.access_token);
        await client.enroll('diku', user, minted.refresh_token);
        watcher.subscribe('diku', user);
      }
      await watcher.until(
        () => users.every((u) => (watcher.latest('diku', u)?.generation ?? 0) >= 4),
        12_000,
        'three rotations of every user',
      );
      for (const user of users) {
        seen.add((await client.getToken('diku', user)).token!.accessToken);
        for (const event of watcher.of('diku', user))
          if (event.accessToken) seen.add(event.accessToken);
      }
      for (const token of broker.idp.tokenValues()) seen.add(token);
      expect(seen.size).toBeGreaterThanOrEqual(users.length * 8);

      const [state, ...lockNodes] = await Promise.all(redis.urls.map(dumpNode));
      let leaks = 0;
      for (const node of [state!, ...lockNodes])
        for (const text of node.values()) leaks += leakCount(text, seen);
      expect(leaks).toBe(0);
      expect(leakCount(published.join('\n'), seen)).toBe(0);
      expect(published.length).toBeGreaterThanOrEqual(users.length * 4);

      // The state is there, sealed: one hash per session, the due queue and the index.
      const keys = new KeySpace(topology.prefix);
      for (const user of users) {
        const fields = state!.get(keys.session({ tenant: 'diku', user }))?.split('\n') ?? [];
        expect(fields.filter((_, i) => i % 2 === 1).sort()).toEqual(['gen', 'sealed', 'used']);
        const sealed = fields[fields.indexOf('sealed') + 1] ?? '';
        expect(sealed.split('.').length).toBe(5); // compact JWE
      }
      // Each user's due entry and index entry sit in the shard of its session (keys.ts).
      for (const user of users) {
        const shard = KeySpace.shardOf(KeySpace.sessionId({ tenant: 'diku', user }));
        expect(state!.has(keys.due(shard))).toBe(true);
        expect(state!.has(keys.index(shard))).toBe(true);
      }
      for (const key of state!.keys()) expect(key).not.toMatch(/:lock:/);
      // Lock nodes hold lock keys only, and were used.
      for (const [i, node] of lockNodes.entries()) {
        for (const key of node.keys()) expect(key).toMatch(/^t[0-9a-f]{8}:lock:\{[^{}]+\}$/);
        const lockNode = new Redis(redis.urls[i + 1]!);
        const info = await lockNode.info('commandstats').finally(() => lockNode.disconnect());
        expect(info).toMatch(/cmdstat_(evalsha|eval):calls=[1-9]/);
      }
    } finally {
      watcher.close();
      subscriber.disconnect();
      await stopAll();
    }
  });

  it('revokes at once: REVOKED to watchers, IdP revocation, no refresh afterwards', async () => {
    const broker = await startTestBroker(fast, freshTopology(), { TB_REFRESH_RATIO: '0.5' });
    const { client } = broker;
    const minted = await fast.mintTokens('revoke-me');
    await client.enroll('diku', 'revoke-me', minted.refresh_token);
    const watcher = client.watch();
    watcher.subscribe('diku', 'revoke-me');
    await watcher.until(() => (watcher.latest('diku', 'revoke-me')?.generation ?? 0) >= 2);
    const revocations = fast.counters.revocations;

    const revoked = (await client.revoke('diku', 'revoke-me')).session!;
    expect(revoked.status).toBe(SessionStatus.SESSION_STATUS_REVOKED);
    const requests = fast.counters.refreshRequests;
    const calls = broker.idp.calls.length;
    expect(fast.counters.revocations).toBe(revocations + 1);
    await watcher.until(
      () => watcher.latest('diku', 'revoke-me')?.status === SessionStatus.SESSION_STATUS_REVOKED,
    );
    expect(watcher.latest('diku', 'revoke-me')!.accessToken).toBe('');
    expect(watcher.latest('diku', 'revoke-me')!.generation).toBe(revoked.generation);
    expect((await rpcError(client.getToken('diku', 'revoke-me'))).code).toBe(
      grpc.status.FAILED_PRECONDITION,
    );
    expect((await rpcError(client.refresh('diku', 'revoke-me', revoked.generation))).code).toBe(
      grpc.status.FAILED_PRECONDITION,
    );
    // Revoking twice is harmless and calls the IdP no more.
    expect((await client.revoke('diku', 'revoke-me')).session?.generation).toBe(revoked.generation);
    expect(fast.counters.revocations).toBe(revocations + 1);

    // Unrevoked, it would rotate about every second.
    await sleep(2_000);
    expect(fast.counters.refreshRequests).toBe(requests);
    expect(broker.idp.calls.length).toBe(calls);
    watcher.close();
    await stopAll();
  });

  it('lets an unused session go IDLE and keeps a watched one ACTIVE; a read reactivates', async () => {
    const broker = await startTestBroker(fast, freshTopology(), {
      TB_REFRESH_RATIO: '0.5',
      TB_SESSION_IDLE_TIMEOUT_MS: '1500',
    });
    const { client } = broker;
    const unused = await fast.mintTokens('idle-unused');
    const watched = await fast.mintTokens('idle-watched');
    const later = await fast.mintTokens('idle-later');
    await client.enroll('diku', 'idle-unused', unused.refresh_token);
    await client.enroll('diku', 'idle-watched', watched.refresh_token);
    await client.enroll('diku', 'idle-later', later.refresh_token);
    const watcher = client.watch();
    watcher.subscribe('diku', 'idle-watched');

    const statusOf = async (user: string) =>
      (await client.list('diku')).sessions.find((s) => s.user === user)!;
    await eventually(
      async () =>
        (await statusOf('idle-unused')).status === SessionStatus.SESSION_STATUS_IDLE &&
        (await statusOf('idle-later')).status === SessionStatus.SESSION_STATUS_IDLE,
      8_000,
      'the unused sessions to go idle',
    );
    const idle = await statusOf('idle-unused');
    expect(idle.nextRefreshAt).toBeUndefined();
    const unusedCalls = broker.idp.familyCalls(unused.refresh_token).length;
    const watchedGeneration = watcher.latest('diku', 'idle-watched')?.generation ?? 0;

    // Two more idle timeouts: the watched session keeps rotating, the idle one is left alone.
    await sleep(3_000);
    expect(broker.idp.familyCalls(unused.refresh_token).length).toBe(unusedCalls);
    expect((await statusOf('idle-unused')).generation).toBe(idle.generation);
    expect((await statusOf('idle-watched')).status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
    const watchedEvents = watcher.of('diku', 'idle-watched');
    expect(watchedEvents.every((e) => e.status === SessionStatus.SESSION_STATUS_ACTIVE)).toBe(true);
    expect(watcher.latest('diku', 'idle-watched')!.generation).toBeGreaterThan(watchedGeneration);

    // A read brings the idle session back with a valid token.
    const token = (await client.getToken('diku', 'idle-unused')).token!;
    expect(token.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
    expect(token.accessToken.length).toBeGreaterThan(0);
    expect(ms(token.expiresAt)).toBeGreaterThan(Date.now());
    expect(token.generation).toBeGreaterThan(idle.generation);
    expect((await statusOf('idle-unused')).status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);

    // So does a watch: the watcher first sees IDLE, then an active, valid token.
    const laterIdle = await statusOf('idle-later');
    expect(laterIdle.status).toBe(SessionStatus.SESSION_STATUS_IDLE);
    watcher.subscribe('diku', 'idle-later');
    await watcher.until(
      () => {
        const latest = watcher.latest('diku', 'idle-later');
        return latest?.status === SessionStatus.SESSION_STATUS_ACTIVE && latest.accessToken !== '';
      },
      5_000,
      'a watch to reactivate the idle session',
    );
    const revived = watcher.latest('diku', 'idle-later')!;
    expect(revived.generation).toBeGreaterThan(laterIdle.generation);
    expect(ms(revived.expiresAt)).toBeGreaterThan(Date.now());
    expect(fast.counters.reuses).toBe(0);
    watcher.close();
    await stopAll();
  });

  it('coalesces Refresh(generation) into one rotation on one replica and across two', async () => {
    const topology = freshTopology();
    const a = await startTestBroker(steady, topology);
    const b = await startTestBroker(steady, topology);
    const minted = await steady.mintTokens('coalesce');
    const g1 = (await a.client.enroll('diku', 'coalesce', minted.refresh_token)).session!
      .generation;

    const expectOneRotation = async (calls: Promise<{ token?: TokenEvent }>[], from: number) => {
      const tokens = (await Promise.all(calls)).map((r) => r.token!);
      expect(tokens.every((t) => t.generation === from + 1)).toBe(true);
      expect(tokens.every((t) => t.accessToken === tokens[0]!.accessToken)).toBe(true);
      expect(tokens[0]!.accessToken.length).toBeGreaterThan(0);
      return tokens[0]!;
    };

    let refreshes = steady.counters.refreshes;
    const one = Array.from({ length: 20 }, () => a.client.refresh('diku', 'coalesce', g1));
    const t2 = await expectOneRotation(one, g1);
    expect(steady.counters.refreshes - refreshes).toBe(1);

    refreshes = steady.counters.refreshes;
    const two = Array.from({ length: 20 }, (_, i) =>
      (i % 2 === 0 ? a : b).client.refresh('diku', 'coalesce', g1 + 1),
    );
    const t3 = await expectOneRotation(two, g1 + 1);
    expect(t3.accessToken === t2.accessToken).toBe(false);
    expect(steady.counters.refreshes - refreshes).toBe(1);

    // An older generation gets the current token; the IdP is not asked.
    const requests = steady.counters.refreshRequests;
    for (const broker of [a, b]) {
      const current = (await broker.client.refresh('diku', 'coalesce', g1)).token!;
      expect(current.generation).toBe(g1 + 2);
      expect(current.accessToken === t3.accessToken).toBe(true);
    }
    expect(steady.counters.refreshRequests).toBe(requests);
    expect(steady.counters.reuses).toBe(0);
    expect(
      (await a.metrics.value('tb_broker_reuse_suspicions')) +
        (await b.metrics.value('tb_broker_reuse_suspicions')),
    ).toBe(0);
    await stopAll();
  });

  it('rejects bad input with precise codes and pages sessions without token values', async () => {
    const broker = await startTestBroker(steady, freshTopology());
    const { client } = broker;
    const minted = await steady.mintTokens('input');

    const noTenant = await rpcError(client.enroll('', 'input', minted.refresh_token));
    expect(noTenant.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(noTenant.details.startsWith('tenant ')).toBe(true);
    const unknownIdp = await rpcError(
      new Promise((resolve, reject) =>
        client.raw.enroll(
          {
            tenant: 'diku',
            user: 'input',
            idp: 'no-such-idp',
            credential: { $case: 'refreshToken', value: minted.refresh_token },
          },
          (err, res) => (err ? reject(err) : resolve(res)),
        ),
      ),
    );
    expect(unknownIdp.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(unknownIdp.details.startsWith('idp ')).toBe(true);
    // Neither attempt presented the token.
    expect(steady.presentationsOf(minted.refresh_token)).toBe(0);
    expect((await rpcError(client.getToken('diku', 'nobody'))).code).toBe(grpc.status.NOT_FOUND);
    const badPage = await rpcError(client.list('', 0, 'not-a-page-token'));
    expect(badPage.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(badPage.details.startsWith('page_token ')).toBe(true);

    // A bad subscription gets a WatchError; the stream stays usable.
    const watcher = client.watch();
    watcher.subscribe('diku', '');
    await watcher.until(() => watcher.errors.length >= 1);
    expect(watcher.errors[0]!.code).toBe('INVALID_ARGUMENT');
    expect(watcher.errors[0]!.message.startsWith('user ')).toBe(true);
    await client.enroll('diku', 'input', minted.refresh_token);
    watcher.subscribe('diku', 'input');
    await watcher.until(() => (watcher.latest('diku', 'input')?.accessToken ?? '') !== '');
    expect(watcher.ended).toBe(false);
    watcher.close();

    // Seven sessions in one tenant, two in another; pages of three.
    const known = new Set<string>([minted.refresh_token]);
    const users = Array.from({ length: 7 }, (_, i) => `page-${i}`);
    for (const [tenant, names] of [
      ['paging', users],
      ['elsewhere', ['page-x', 'page-y']],
    ] as const) {
      for (const user of names) {
        const tokens = await steady.mintTokens(`${tenant}-${user}`);
        known.add(tokens.refresh_token).add(tokens.access_token);
        await client.enroll(tenant, user, tokens.refresh_token);
        known.add((await client.getToken(tenant, user)).token!.accessToken);
      }
    }
    for (const token of broker.idp.tokenValues()) known.add(token);
    const listed: string[] = [];
    let pageToken = '';
    let pages = 0;
    do {
      const page = await client.list('paging', 3, pageToken);
      expect(leakCount(JSON.stringify(page), known)).toBe(0);
      expect(page.sessions.length).toBeLessThanOrEqual(3);
      listed.push(...page.sessions.map((s) => `${s.tenant}/${s.user}`));
      pageToken = page.nextPageToken;
      pages++;
    } while (pageToken && pages < 10);
    expect(pages).toBe(3);
    expect([...listed].sort()).toEqual(users.map((u) => `paging/${u}`).sort());
    const everything = await client.list('', 0);
    expect(everything.sessions.length).toBe(10);
    expect(leakCount(JSON.stringify(everything), known)).toBe(0);
    await stopAll();
  });
});

/** A MemorySessionStore whose writes of one generation fail, as if the store went away. */
class FailingStore extends MemorySessionStore {
  failGeneration = -1;
  /** Writes of that generation to fail before they succeed again (default: all). */
  failTimes = Number.POSITIVE_INFINITY;
  failedWrites = 0;

  override commit(
    transition: Transition,
    expectedGeneration: number | null,
    now: number,
  ): Promise<boolean> {
    if (transition.next.generation === this.failGeneration && this.failedWrites < this.failTimes) {
      this.failedWrites++;
      return Promise.reject(new Error('state store unreachable'));
    }
    return super.commit(transition, expectedGeneration, now);
  }
}

describe('persist, then publish (promise 3)', () => {
  it('never publishes or returns a pair it could not store, and counts the failure', async () => {
    const store = new FailingStore();
    const locks = new MemoryLockService(2_000);
    const keys = new KeySpace('tb:');
    const idp = new RecordingIdp(oauth2For(steady, 1_000));
    const idps = new Map([[idp.name, idp]]);
    const metrics = new MetricSnapshot();
    const policy = new RotationPolicy({ minLeadMs: 500, retryBaseMs: 200, retryMaxMs: 2_000 });
    const rotator = new Rotator(
      {
        replica: 'persist-test',
        idpTimeoutMs: 1_000,
        lockMarginMs: 500,
        idleTimeoutMs: 3_600_000,
        busyRetryMs: 250,
        persistRetryMs: 300,
      },
      { store, locks, keys, idps, policy, metrics: new BrokerMetrics(metrics.meter), log: silent },
    );
    const hub = new WatchHub(store, silent);
    await store.subscribe((event) => hub.onEvent(event));
    const sessions = new SessionService(
      {
        defaultIdp: 'default',
        refreshMinIntervalMs: 0,
        refreshWaitMs: 2_000,
        touchIntervalMs: 1_000,
      },
      { store, locks, keys, idps, rotator, hub, log: silent },
    );
    // The gRPC edge alone around a failing store: no TLS and no caller authentication here
    // (both are tested in caller-auth.test.ts), so the client speaks plaintext.
    const server = new BrokerGrpcServer({ sessions, hub, log: silent });
    const client = new BrokerClient(`127.0.0.1:${await server.listen('127.0.0.1:0')}`, 'plaintext');
    try {
      const minted = await steady.mintTokens('persist');
      const g1 = (await client.enroll('diku', 'persist', minted.refresh_token)).session!.generation;
      const watcher = client.watch();
      watcher.subscribe('diku', 'persist');
      await watcher.until(() => watcher.latest('diku', 'persist')?.generation === g1);
      const current = watcher.latest('diku', 'persist')!;

      store.failGeneration = g1 + 1;
      const refreshes = steady.counters.refreshes;
      const failed = await rpcError(client.refresh('diku', 'persist', g1));
      expect(failed.code).toBe(grpc.status.UNAVAILABLE);
      expect(steady.counters.refreshes - refreshes).toBe(1); // the IdP did answer
      const lost = idp.calls.at(-1)!;
      expect(lost.outcome).toBe('ok');
      expect(await metrics.value('tb_broker_persist_failures')).toBe(1);
      expect(store.failedWrites).toBeGreaterThanOrEqual(1);
      expect(await metrics.value('tb_broker_rotations', { outcome: 'rotated' })).toBe(1); // the enrollment's only

      // Readers keep the stored generation; nothing of the lost pair leaves the broker.
      const read = (await client.getToken('diku', 'persist')).token!;
      expect(read.generation).toBe(g1);
      expect(read.accessToken === current.accessToken).toBe(true);

      // Barrier: a later session's first state reaches the same stream, so anything published
      // for the failed rotation would have arrived by now.
      const barrier = await steady.mintTokens('persist-barrier');
      await client.enroll('diku', 'persist-barrier', barrier.refresh_token);
      watcher.subscribe('diku', 'persist-barrier');
      await watcher.until(() => watcher.latest('diku', 'persist-barrier') !== undefined);
      const events = watcher.of('diku', 'persist');
      expect(events.map((e) => e.generation)).toEqual([g1]);
      const lostAccessToken = lost.tokens!.accessToken;
      expect(events.some((e) => e.accessToken === lostAccessToken)).toBe(false);
      expect(read.accessToken === lostAccessToken).toBe(false);
      watcher.close();
    } finally {
      client.close();
      await server.shutdown(500);
      await store.close();
    }
  });

  it('stores an enrollment whose first write fails on a retry under the lock (promise 3)', async () => {
    const store = new FailingStore();
    store.failGeneration = 1;
    store.failTimes = 1;
    const locks = new MemoryLockService(2_000);
    const keys = new KeySpace('tb:');
    const idp = new RecordingIdp(oauth2For(steady, 1_000));
    const idps = new Map([[idp.name, idp]]);
    const policy = new RotationPolicy({ minLeadMs: 500, retryBaseMs: 200, retryMaxMs: 2_000 });
    const rotator = new Rotator(
      {
        replica: 'enroll-retry-test',
        idpTimeoutMs: 1_000,
        lockMarginMs: 500,
        idleTimeoutMs: 3_600_000,
        busyRetryMs: 250,
      },
      { store, locks, keys, idps, policy, log: silent },
    );
    const hub = new WatchHub(store, silent);
    const sessions = new SessionService(
      {
        defaultIdp: 'default',
        refreshMinIntervalMs: 0,
        refreshWaitMs: 2_000,
        touchIntervalMs: 1_000,
      },
      { store, locks, keys, idps, rotator, hub, log: silent },
    );
    try {
      const minted = await steady.mintTokens('enroll-retry');
      const refreshes = steady.counters.refreshes;
      const meta = await sessions.enroll({
        tenant: 'diku',
        user: 'enroll-retry',
        refreshToken: minted.refresh_token,
      });
      expect(meta.generation).toBe(1);
      expect(meta.status).toBe('ACTIVE');
      expect(store.failedWrites).toBe(1);
      // The caller's credential was presented once; the stored pair is the one the IdP issued.
      expect(steady.counters.refreshes - refreshes).toBe(1);
      const stored = (await store.get({ tenant: 'diku', user: 'enroll-retry' }))!.record;
      expect(stored.accessToken === idp.calls.at(-1)!.tokens!.accessToken).toBe(true);
    } finally {
      await store.close();
    }
  });
});
