import { connect } from 'node:net';

import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  MINT_GRANT_TYPE,
  startOidcProvider,
  type ClientKind,
  type OidcProviderHarness,
} from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

/** Connects once, without retries, and returns the PING reply. */
async function ping(url: string): Promise<string> {
  const client = new Redis(url, {
    lazyConnect: true,
    retryStrategy: () => null,
    maxRetriesPerRequest: 0,
    connectTimeout: 2_000,
  });
  client.on('error', () => {});
  try {
    await client.connect();
    return await client.ping();
  } finally {
    client.disconnect();
  }
}

/** The errno code of a plain TCP connect to 127.0.0.1:port, or 'connected'. */
async function tcpConnectOutcome(port: number): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve('connected');
    });
    socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
  });
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The errno code under a failed fetch, e.g. ECONNREFUSED. */
async function fetchFailureCode(request: Promise<Response>): Promise<string | undefined> {
  try {
    await request;
    return undefined;
  } catch (err) {
    const cause = (err as { cause?: { code?: string } }).cause;
    return cause?.code ?? 'no-code';
  }
}

describe('redis nodes', () => {
  let redis: RedisNodes;

  beforeAll(async () => {
    redis = await startRedisNodes(3);
  });
  afterAll(async () => {
    await redis?.stopAll();
  });

  it('starts three servers on distinct ports that answer PING', async () => {
    expect(redis.nodes).toHaveLength(3);
    expect(new Set(redis.nodes.map((n) => n.port)).size).toBe(3);
    for (const node of redis.nodes) {
      expect(node.url).toBe(`redis://127.0.0.1:${node.port}`);
      expect(node.running).toBe(true);
    }
    expect(redis.urls).toEqual(redis.nodes.map((n) => n.url));
    expect(await Promise.all(redis.urls.map(ping))).toEqual(['PONG', 'PONG', 'PONG']);
  });

  it('kill() takes one node away while the others answer, restart() brings it back empty', async () => {
    const [victim, ...others] = redis.nodes;
    const client = new Redis(victim!.url, { lazyConnect: true, maxRetriesPerRequest: 0 });
    await client.connect();
    await client.set('harness:key', 'v');
    client.disconnect();

    const oldPid = victim!.pid;
    await victim!.kill();
    expect(victim!.running).toBe(false);
    expect(isAlive(oldPid)).toBe(false);
    expect(await tcpConnectOutcome(victim!.port)).toBe('ECONNREFUSED');
    expect(await Promise.all(others.map((n) => ping(n.url)))).toEqual(['PONG', 'PONG']);

    await victim!.restart();
    expect(victim!.running).toBe(true);
    expect(victim!.pid).not.toBe(oldPid);
    const again = new Redis(victim!.url, { lazyConnect: true, maxRetriesPerRequest: 0 });
    await again.connect();
    expect(await again.get('harness:key')).toBeNull();
    again.disconnect();
  });

  it('stop() ends a node gracefully', async () => {
    const node = redis.nodes[1]!;
    const pid = node.pid;
    await node.stop();
    expect(isAlive(pid)).toBe(false);
    expect(await tcpConnectOutcome(node.port)).toBe('ECONNREFUSED');
    await node.restart();
    expect(await ping(node.url)).toBe('PONG');
  });

  it('stopAll() leaves no redis-server process behind', async () => {
    const pids = redis.nodes.map((n) => n.pid);
    await redis.stopAll();
    expect(pids.filter(isAlive)).toEqual([]);
    expect(redis.nodes.every((n) => !n.running)).toBe(true);
    await redis.stopAll();
  });
});

describe('oidc provider', () => {
  let idp: OidcProviderHarness;

  beforeAll(async () => {
    idp = await startOidcProvider({ accessTokenTtlSeconds: 3 });
  });
  afterAll(async () => {
    await idp?.close();
  });

  async function refresh(refreshToken: string, client: ClientKind) {
    const res = await idp.postToken(
      { grant_type: 'refresh_token', refresh_token: refreshToken },
      client,
    );
    const body = (await res.json()) as {
      refresh_token?: string;
      access_token?: string;
      error?: string;
    };
    return { status: res.status, body };
  }

  it('advertises its endpoints in discovery', async () => {
    const res = await fetch(`${idp.issuer}/.well-known/openid-configuration`);
    const doc = (await res.json()) as Record<string, unknown>;
    expect(doc['issuer']).toBe(idp.issuer);
    expect(doc['token_endpoint']).toBe(idp.tokenEndpoint);
    expect(doc['revocation_endpoint']).toBe(idp.revocationEndpoint);
    expect(doc['grant_types_supported']).toContain(MINT_GRANT_TYPE);
  });

  it.each(['basic', 'post'] as const)('mints and rotates with client_secret_%s', async (client) => {
    idp.resetCounters();
    const minted = await idp.mintTokens(`rotate-${client}`, client);
    expect(minted.expires_in).toBe(3);
    expect(minted.refresh_token.length).toBeGreaterThan(20);

    const first = await refresh(minted.refresh_token, client);
    expect(first.status).toBe(200);
    expect(typeof first.body.refresh_token).toBe('string');
    expect(first.body.refresh_token === minted.refresh_token).toBe(false);
    expect(first.body.access_token === minted.access_token).toBe(false);

    const second = await refresh(first.body.refresh_token!, client);
    expect(second.status).toBe(200);
    expect(second.body.refresh_token === first.body.refresh_token).toBe(false);

    expect(idp.counters).toMatchObject({
      refreshRequests: 2,
      refreshes: 2,
      reuses: 0,
      serverErrors: 0,
    });
    expect(idp.presentationsOf(minted.refresh_token)).toBe(1);
    expect(Math.max(...idp.presentations().values())).toBe(1);
  });

  it('a token belongs to the client that minted it', async () => {
    const minted = await idp.mintTokens('cross-client', 'post');
    const wrong = await refresh(minted.refresh_token, 'basic');
    expect(wrong).toMatchObject({ status: 400, body: { error: 'invalid_grant' } });
  });

  it('reuse of a consumed refresh token revokes the grant, killing the newest token too', async () => {
    idp.resetCounters();
    const minted = await idp.mintTokens('reuse');
    const rotated = await refresh(minted.refresh_token, 'basic');
    expect(rotated.status).toBe(200);

    const replay = await refresh(minted.refresh_token, 'basic');
    expect(replay).toMatchObject({ status: 400, body: { error: 'invalid_grant' } });
    expect(idp.counters).toMatchObject({ reuses: 1, revokedGrants: 1, invalidGrants: 1 });
    expect(idp.presentationsOf(minted.refresh_token)).toBe(2);

    const newest = await refresh(rotated.body.refresh_token!, 'basic');
    expect(newest).toMatchObject({ status: 400, body: { error: 'invalid_grant' } });
    expect(idp.counters).toMatchObject({ refreshes: 1, refreshRequests: 3, invalidGrants: 2 });
    expect(idp.counters.reuses).toBe(1);
  });

  it('revokeGrantOf() and the revocation endpoint make a family dead', async () => {
    idp.resetCounters();
    const a = await idp.mintTokens('revoked-by-harness');
    expect(await idp.revokeGrantOf('revoked-by-harness')).toBe(1);
    expect(await refresh(a.refresh_token, 'basic')).toMatchObject({
      body: { error: 'invalid_grant' },
    });

    const b = await idp.mintTokens('revoked-by-client', 'post');
    const { clientId, clientSecret } = idp.clients.post;
    const res = await fetch(idp.revocationEndpoint, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        token: b.refresh_token,
        client_id: clientId,
        client_secret: clientSecret,
      }),
    });
    expect(res.status).toBe(200);
    expect(idp.counters).toMatchObject({ revocations: 1, revokedGrants: 1 });
    expect(await refresh(b.refresh_token, 'post')).toMatchObject({
      body: { error: 'invalid_grant' },
    });
  });

  it('injects 503 with Retry-After before the provider, then recovers', async () => {
    const minted = await idp.mintTokens('fault-503');
    idp.resetCounters();
    idp.setFault({ kind: 'status', status: 503, retryAfterSeconds: 2, times: 1 });
    const res = await idp.postToken({
      grant_type: 'refresh_token',
      refresh_token: minted.refresh_token,
    });
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toBe('2');
    expect(((await res.json()) as { error?: string }).error).toBe('temporarily_unavailable');
    expect(idp.counters).toMatchObject({ refreshRequests: 1, refreshes: 0, faultsInjected: 1 });
    expect(idp.presentationsOf(minted.refresh_token)).toBe(0);

    // `times: 1` used up: the same token still works.
    expect((await refresh(minted.refresh_token, 'basic')).status).toBe(200);
    expect(idp.counters).toMatchObject({ refreshRequests: 2, refreshes: 1 });
  });

  it('delay holds the answer, drop-response rotates but never answers', async () => {
    const minted = await idp.mintTokens('fault-delay');
    idp.setFault({ kind: 'delay', ms: 300, times: 1 });
    const started = Date.now();
    const delayed = await refresh(minted.refresh_token, 'basic');
    expect(delayed.status).toBe(200);
    expect(Date.now() - started).toBeGreaterThanOrEqual(290);

    idp.resetCounters();
    idp.setFault({ kind: 'drop-response', times: 1 });
    const code = await fetchFailureCode(
      idp.postToken({ grant_type: 'refresh_token', refresh_token: delayed.body.refresh_token! }),
    );
    expect(code).toBeDefined();
    expect(idp.counters).toMatchObject({ refreshes: 1, faultsInjected: 1 });
    // The client kept the consumed token: presenting it again is a reuse.
    expect((await refresh(delayed.body.refresh_token!, 'basic')).status).toBe(400);
    expect(idp.counters.reuses).toBe(1);
  });

  it('stopListening() refuses connections, resumeListening() serves on the same port', async () => {
    const minted = await idp.mintTokens('listener');
    const port = idp.port;
    await idp.stopListening();
    expect(
      await fetchFailureCode(
        idp.postToken({ grant_type: 'refresh_token', refresh_token: minted.refresh_token }),
      ),
    ).toBe('ECONNREFUSED');
    await idp.resumeListening();
    expect(new URL(idp.tokenEndpoint).port).toBe(String(port));
    expect((await refresh(minted.refresh_token, 'basic')).status).toBe(200);
  });
});
