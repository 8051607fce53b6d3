/**
 * One rotation, followed through telemetry: a broker in this process (Redis state, 3 Redlock
 * nodes, the in-process OIDC provider) and two sidecars, with a test tracer provider and the
 * production auto-instrumentations. The rotation's trace must hold its lock, its IdP call and its
 * Redis write, and both sidecars' deliveries as children; and no span, event, link or log line of
 * the whole run may contain a token value or the raw user id.
 */
import { telemetry, parentOf } from '../harness/telemetry-capture.js';
import { createHash, randomBytes } from 'node:crypto';
import { context } from '@opentelemetry/api';
import { suppressTracing } from '@opentelemetry/core';
import { pino, type Logger } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startBroker, type RunningBroker } from '../../broker/broker-app.js';
import { loadConfig } from '../../broker/config.js';
import type { IdpAdapter, TokenSet } from '../../broker/idp/idp-adapter.js';
import { createIdpAdapter } from '../../broker/idp/idp-factory.js';
import { traceLogFields } from '../../shared/telemetry/log-mixin.js';
import { devIdentity } from '../../scripts/dev/dev-identity.js';
import { loadSidecarConfig } from '../../sidecar/config.js';
import { startSidecar, type RunningSidecar } from '../../sidecar/sidecar-app.js';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';
import type { ReadableSpan } from '@opentelemetry/sdk-trace';

const TENANT = 'diku';
const USER = `user-${randomBytes(6).toString('hex')}`;
const HEADER = { 'x-token-broker': 'true' };

/** Every token value the run saw: minted, returned by the IdP, presented to it, served. */
const tokens = new Set<string>();
const logLines: string[] = [];

function capturingLogger(name: string): Logger {
  return pino(
    { name, level: 'trace', mixin: traceLogFields },
    { write: (line: string) => void logLines.push(line) },
  );
}

/** The configured adapter, recording every token it sees (for the leak search). */
function recording(adapter: IdpAdapter): IdpAdapter {
  const keep = (set: TokenSet) => {
    tokens.add(set.accessToken);
    if (set.refreshToken) tokens.add(set.refreshToken);
    return set;
  };
  return {
    name: adapter.name,
    refresh: async (refreshToken, signal, context) => {
      tokens.add(refreshToken);
      return keep(await adapter.refresh(refreshToken, signal, context));
    },
    revoke: (refreshToken, signal, context) => adapter.revoke(refreshToken, signal, context),
  };
}

let redis: RedisNodes;
let oidc: OidcProviderHarness;
let broker: RunningBroker;
let client: BrokerClient;
const sidecars: RunningSidecar[] = [];

/** A module's read; the test's own HTTP client is not traced (it is not part of the system). */
async function read(sidecar: RunningSidecar, minGeneration: number) {
  const url = `http://127.0.0.1:${sidecar.port}/v1/tokens/${TENANT}/${USER}?wait=8000&min_generation=${minGeneration}`;
  const res = await context.with(suppressTracing(context.active()), () =>
    fetch(url, { headers: HEADER }),
  );
  expect(res.status).toBe(200);
  const body = (await res.json()) as { access_token: string; generation: number };
  tokens.add(body.access_token);
  return body;
}

beforeAll(async () => {
  redis = await startRedisNodes(4);
  oidc = await startOidcProvider({ accessTokenTtlSeconds: 5 });
  const env = brokerEnv(oidc, redisTopology(redis.urls), { TB_REPLICA_ID: 'replica-a' });
  const config = loadConfig(env);
  const idps = new Map(config.idps.map((idp) => [idp.name, recording(createIdpAdapter(idp))]));
  broker = await startBroker(config, capturingLogger('token-broker'), { idps });
  client = new BrokerClient(`127.0.0.1:${broker.port}`);

  const minted = await oidc.mintTokens(USER);
  tokens.add(minted.access_token);
  tokens.add(minted.refresh_token);
  await client.enroll(TENANT, USER, minted.refresh_token);
  for (let i = 0; i < 2; i++)
    sidecars.push(
      await startSidecar(
        loadSidecarConfig({
          TB_SIDECAR_BROKER_ADDRESS: `127.0.0.1:${broker.port}`,
          ...devIdentity().sidecarEnv(),
          TB_SIDECAR_PORT: '0',
          TB_SIDECAR_USERS: `${TENANT}/${USER}`,
          TB_SIDECAR_SAFETY_SKEW_MS: '500',
        }),
        capturingLogger(`sidecar-${i}`),
      ),
    );
  for (const sidecar of sidecars) expect((await read(sidecar, 1)).generation).toBe(1);
  // Reading generation 2 makes the sidecars ask the broker to Refresh. The first attempt meets a
  // 503 (so a failed attempt is traced and logged too); its retry rotates.
  oidc.setFault({ kind: 'status', status: 503, times: 1 });
  for (const sidecar of sidecars) expect((await read(sidecar, 2)).generation).toBe(2);
}, 30_000);

afterAll(async () => {
  await Promise.all(sidecars.map((s) => s.stop()));
  client?.close();
  await broker?.stop();
  await oidc?.close();
  await redis?.stopAll();
  await telemetry.shutdown();
});

function rotationTo(generation: number): ReadableSpan | undefined {
  return telemetry
    .spans()
    .find(
      (s) =>
        s.name === 'broker.rotate' &&
        s.attributes['tb.generation.to'] === generation &&
        s.attributes['tb.outcome'] === 'rotated',
    );
}

describe('telemetry of one rotation', () => {
  it('traces the lock, the IdP call, the Redis write and both sidecar deliveries', async () => {
    await eventually(() => rotationTo(2) !== undefined, 5_000, 'the rotation span');
    const rotate = rotationTo(2)!;
    const { traceId, spanId } = rotate.spanContext();
    expect(rotate.attributes).toMatchObject({
      'tb.tenant': TENANT,
      'tb.user_hash': createHash('sha256').update(USER).digest('hex').slice(0, 16),
      'tb.replica': 'replica-a',
      'tb.generation.from': 1,
      'tb.generation.to': 2,
      'tb.outcome': 'rotated',
      'tb.idp': 'default',
    });
    expect(rotate.attributes['tb.lock.wait_ms']).toBeGreaterThanOrEqual(0);
    expect(rotate.attributes['tb.idp.latency_ms']).toBeGreaterThan(0);

    const deliveries = () =>
      telemetry
        .spans()
        .filter(
          (s) =>
            s.name === 'sidecar.deliver' &&
            parentOf(s) === spanId &&
            s.attributes['tb.generation'] === 2 &&
            s.attributes['tb.outcome'] === 'applied',
        );
    await eventually(() => deliveries().length >= 2, 5_000, 'deliveries to both sidecars');
    // Each sidecar applies generation 2 once: two applied deliveries are two sidecars.
    expect(deliveries()).toHaveLength(2);
    for (const delivery of deliveries()) expect(delivery.spanContext().traceId).toBe(traceId);

    const trace = telemetry.spans().filter((s) => s.spanContext().traceId === traceId);
    const childrenOf = (parent: ReadableSpan) =>
      trace.filter((s) => parentOf(s) === parent.spanContext().spanId);
    const child = (name: string) => {
      const found = childrenOf(rotate).find((s) => s.name === name);
      expect(found, name).toBeDefined();
      return found!;
    };
    const isRedis = (s: ReadableSpan) =>
      (s.attributes['db.system.name'] ?? s.attributes['db.system']) === 'redis';

    // The lock: taken through Redlock's scripts on the lock nodes, and given back.
    const acquire = child('lock.acquire');
    expect(childrenOf(acquire).filter(isRedis).length).toBeGreaterThanOrEqual(2);
    expect(child('lock.release').attributes['tb.lock.nodes']).toBe(3);
    // The IdP call, with the HTTP request under it.
    const idp = child('idp.refresh');
    expect(idp.attributes['tb.idp']).toBe('default');
    expect(childrenOf(idp).some((s) => s.name === 'POST')).toBe(true);
    // Its own HTTP attributes, which stand for that span when client spans are off.
    expect(idp.attributes['http.response.status_code']).toBe(200);
    expect(idp.attributes['server.address']).toBe('127.0.0.1');
    // The Redis write: the compare-and-set script under broker.persist.
    const persist = child('broker.persist');
    const writes = childrenOf(persist).filter(isRedis);
    expect(writes.length).toBeGreaterThanOrEqual(1);
    expect(writes.map((s) => s.name)).toContain('evalsha');
    // Statements are reduced to the command: keys name the user.
    for (const s of trace.filter(isRedis))
      expect(s.attributes['db.query.text'] ?? s.attributes['db.statement']).toBe(s.name);
    // And its re-read of the session, inside the rotation too.
    expect(childrenOf(rotate).some((s) => isRedis(s) && s.name === 'hmget')).toBe(true);
  });

  it('stores the rotation in the record and sends it with the token', async () => {
    const rotate = rotationTo(2)!;
    const { traceId, spanId } = rotate.spanContext();
    const { token } = await client.getToken(TENANT, USER);
    tokens.add(token!.accessToken);
    expect(token!.generation).toBe(2);
    expect(token!.traceparent).toBe(`00-${traceId}-${spanId}-01`);
    // A sidecar's read of generation 2 links to the rotation that produced it.
    await read(sidecars[0]!, 2);
    await eventually(
      () =>
        telemetry
          .spans()
          .some(
            (s) =>
              s.name === 'sidecar.read' &&
              s.attributes['tb.outcome'] === 'OK' &&
              s.links.some((l) => l.context.spanId === spanId && l.context.traceId === traceId),
          ),
      5_000,
      'a sidecar.read linked to the rotation',
    );
  });

  it('traces and logs the failed attempt, with the log line joined to its span', () => {
    const failed = telemetry
      .spans()
      .find((s) => s.name === 'broker.rotate' && s.attributes['tb.outcome'] === 'retry-scheduled');
    expect(failed).toBeDefined();
    expect(failed!.attributes['tb.error_code']).toBe('IDP_UNAVAILABLE');
    const idp = telemetry
      .spans()
      .find((s) => s.name === 'idp.refresh' && parentOf(s) === failed!.spanContext().spanId);
    expect(idp?.status.code).toBe(2); // SpanStatusCode.ERROR
    const line = logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'refresh failed, will retry');
    expect(line).toMatchObject({
      trace_id: failed!.spanContext().traceId,
      span_id: failed!.spanContext().spanId,
    });
  });

  it('puts no token value and no raw user id into any span, event, link or log line', () => {
    const spans = telemetry.spans();
    expect(tokens.size).toBeGreaterThanOrEqual(6);
    expect(spans.length).toBeGreaterThan(30);
    expect(logLines.some((l) => l.includes('"msg":"token event"'))).toBe(true);
    const spanText = spans.map((s) =>
      JSON.stringify({
        name: s.name,
        attributes: s.attributes,
        events: s.events,
        links: s.links,
        status: s.status,
        resource: s.resource.attributes,
      }),
    );
    for (const token of tokens) {
      expect(token.length).toBeGreaterThan(20);
      expect(spanText.filter((t) => t.includes(token))).toEqual([]);
      expect(logLines.filter((l) => l.includes(token))).toEqual([]);
    }
    expect(spanText.filter((t) => t.includes(USER))).toEqual([]);
  });
});
