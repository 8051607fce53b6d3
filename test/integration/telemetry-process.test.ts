/**
 * Telemetry of real processes started as in production (compiled as the images run them: the
 * broker's bundle of dist/bin/, the sidecar's tsc output; `--import` of the telemetry entry, the
 * ESM loader hook, the NodeSDK from OTEL_* variables): so the instrumented packages the bundle
 * leaves outside (scripts/bundle.ts) are seen patched, and the bundled OpenTelemetry API reaches
 * the SDK's providers. A broker over Redis and two sidecars, all
 * exporting traces over OTLP/HTTP JSON to a receiver here, with the Prometheus exporter on. After
 * rotations (one due, one ending in REAUTH_REQUIRED), both processes' /metrics expose the metrics
 * the issue lists, the spans of grpc-js and ioredis exist (the hook worked), a sidecar's delivery
 * span is the child of the broker's rotation span across processes, and a broker exits on SIGTERM
 * within a couple of seconds even with its collector gone. Without OTEL_* variables telemetry is
 * off.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { freePort } from '../../scripts/dev/free-port.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import { startOtlpReceiver, type OtlpReceiver } from '../harness/otlp-receiver.js';
import { sampleValue, samples } from '../harness/prometheus-text.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';
import {
  startSidecarProcess,
  type SidecarProcess,
  type TokenBody,
} from '../../scripts/dev/sidecar-process.js';

const TENANT = 'diku';
const GRPC_SERVICE = 'grpc.tokenbroker.v1.TokenBrokerService';
const ALICE = 'alice';
const BOB = 'bob';

let redis: RedisNodes;
let oidc: OidcProviderHarness;
let receiver: OtlpReceiver;
let broker: BrokerProcess;
let brokerMetricsPort: number;
let client: BrokerClient;
const sidecars: { process: SidecarProcess; metricsPort: number }[] = [];
const tokens = new Set<string>();

function otelEnv(service: string, metricsPort: number): Record<string, string> {
  return {
    OTEL_SERVICE_NAME: service,
    OTEL_TRACES_EXPORTER: 'otlp',
    OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
    OTEL_BSP_SCHEDULE_DELAY: '100',
    OTEL_METRICS_EXPORTER: 'prometheus',
    OTEL_EXPORTER_PROMETHEUS_HOST: '127.0.0.1',
    OTEL_EXPORTER_PROMETHEUS_PORT: String(metricsPort),
  };
}

const scrape = async (port: number) => (await fetch(`http://127.0.0.1:${port}/metrics`)).text();

async function token(sidecar: SidecarProcess, user: string): Promise<TokenBody> {
  const res = await sidecar.token(TENANT, user, { wait: 5_000 });
  expect(res.status).toBe(200);
  const body = (await res.json()) as TokenBody;
  tokens.add(body.access_token);
  return body;
}

beforeAll(async () => {
  [redis, oidc, receiver] = await Promise.all([
    startRedisNodes(4),
    startOidcProvider({ accessTokenTtlSeconds: 3 }),
    startOtlpReceiver(),
  ]);
  brokerMetricsPort = await freePort();
  broker = await startBrokerProcess(
    brokerEnv(oidc, redisTopology(redis.urls), {
      ...otelEnv('token-broker', brokerMetricsPort),
      // Client spans are opt-in; on here to see that the hook instruments ioredis and node:http.
      TB_TRACE_CLIENT_SPANS: 'redis,http',
    }),
    { compiled: true },
  );
  client = new BrokerClient(broker.address);
  for (const user of [ALICE, BOB]) {
    const minted = await oidc.mintTokens(user);
    tokens.add(minted.access_token);
    tokens.add(minted.refresh_token);
    await client.enroll(TENANT, user, minted.refresh_token);
  }
  for (let i = 0; i < 2; i++) {
    const metricsPort = await freePort();
    sidecars.push({
      metricsPort,
      process: await startSidecarProcess(
        {
          TB_SIDECAR_BROKER_ADDRESS: broker.address,
          TB_SIDECAR_USERS: `${TENANT}/${ALICE},${TENANT}/${BOB}`,
          TB_SIDECAR_SAFETY_SKEW_MS: '500',
          ...otelEnv(`token-broker-sidecar-${i}`, metricsPort),
        },
        { compiled: true },
      ),
    });
  }
  // Bob's family dies at the IdP (a logout): his next rotation ends in REAUTH_REQUIRED.
  await oidc.revokeGrantOf(BOB);
  // Alice's due rotation (3 s tokens are due after about 2.2 s) reaches both sidecars.
  for (const { process } of sidecars)
    await eventually(async () => (await token(process, ALICE)).generation >= 2, 10_000, 'gen 2');
  await eventually(
    async () =>
      (await sidecars[0]!.process.token(TENANT, BOB, { wait: 0 })).status === 409 &&
      (await sidecars[1]!.process.token(TENANT, BOB, { wait: 0 })).status === 409,
    10_000,
    'REAUTH_REQUIRED for bob at both sidecars',
  );
}, 60_000);

afterAll(async () => {
  client?.close();
  await Promise.all(sidecars.map((s) => s.process.stop()));
  await broker?.stop();
  await receiver?.close();
  await oidc?.close();
  await redis?.stopAll();
});

describe('telemetry of real processes', () => {
  it("the broker's Prometheus endpoint has every broker metric after rotations", async () => {
    // A rotation is counted when it ends, just after its watchers got the new state.
    const rotations = async (outcome: string) =>
      sampleValue(await scrape(brokerMetricsPort), 'tb_broker_rotations_total', { outcome }) ?? 0;
    // 'rotated' also counts each enrollment's first rotation (2 here, made inside Enroll, which
    // takes the session lock outside the rotator): wait for 3 due rotations beyond them.
    await eventually(async () => (await rotations('rotated')) >= 5, 15_000, 'rotations counted');
    await eventually(async () => (await rotations('reauth-required')) === 1, 15_000, 'reauth');
    const text = await scrape(brokerMetricsPort);
    const value = (name: string, labels: Record<string, string> = {}) =>
      sampleValue(text, name, labels);
    expect(value('tb_broker_rotations_total', { outcome: 'rotated' })).toBeGreaterThanOrEqual(3);
    expect(value('tb_broker_rotations_total', { outcome: 'reauth-required' })).toBe(1);
    expect(
      value('tb_broker_idp_request_duration_seconds_count', { kind: 'refresh', outcome: 'ok' }),
    ).toBeGreaterThanOrEqual(3);
    expect(
      value('tb_broker_idp_request_duration_seconds_count', {
        kind: 'refresh',
        outcome: 'IDP_INVALID_GRANT',
      }),
    ).toBe(1);
    expect(value('tb_broker_lock_wait_seconds_count')).toBeGreaterThanOrEqual(4);
    expect(value('tb_broker_due_lag_seconds_count')).toBeGreaterThanOrEqual(1);
    expect(samples(text, 'tb_broker_due_lag_seconds_bucket').length).toBeGreaterThan(5);
    expect(value('tb_broker_sessions_active')).toBe(1);
    expect(value('tb_broker_sessions_reauth_required')).toBe(1);
    // Each sidecar subscribes each user on its two Watch streams (one replica here: both on it).
    expect(value('tb_broker_watchers')).toBe(8);
    expect(value('tb_broker_reuse_suspicions_total')).toBe(0);
    expect(value('tb_broker_persist_failures_total')).toBe(0);
  });

  it("each sidecar's /metrics and its Prometheus endpoint expose the sidecar metrics", async () => {
    for (const { process, metricsPort } of sidecars) {
      // Deliveries reach a sidecar after the broker counts their rotation, and on a busy machine
      // a sidecar may subscribe only after alice's first due rotation: wait for 3 applied events
      // (alice rotates every ~2.2 s) before reading both endpoints.
      const applied = async () =>
        sampleValue(await scrape(metricsPort), 'tb_sidecar_token_events_total', {
          outcome: 'applied',
        }) ?? 0;
      await eventually(async () => (await applied()) >= 3, 15_000, '3 applied token events');
      const local = await (await process.get('/metrics')).text();
      const exported = await scrape(metricsPort);
      for (const text of [local, exported]) {
        const value = (name: string, labels: Record<string, string> = {}) =>
          sampleValue(text, name, labels);
        expect(value('tb_sidecar_token_reads_total', { code: 'OK' })).toBeGreaterThanOrEqual(1);
        expect(
          value('tb_sidecar_token_reads_total', { code: 'REAUTH_REQUIRED' }),
        ).toBeGreaterThanOrEqual(1);
        expect(value('tb_sidecar_token_age_seconds_count')).toBeGreaterThanOrEqual(1);
        expect(value('tb_sidecar_token_remaining_seconds_count')).toBeGreaterThanOrEqual(1);
        expect(value('tb_sidecar_token_remaining_seconds_bucket', { le: '5' })).toBeDefined();
        expect(value('tb_sidecar_watched_users')).toBe(2);
        expect(value('tb_sidecar_reauth_required_users')).toBe(1);
        expect(value('tb_sidecar_broker_stream_up')).toBe(1);
        expect(
          value('tb_sidecar_token_events_total', { outcome: 'applied' }),
        ).toBeGreaterThanOrEqual(3);
      }
      // The local endpoint is for the process itself: no scope labels, no target_info.
      expect(local).not.toMatch(/otel_scope_name|target_info/);
      expect(exported).toMatch(/^target_info\{.*service_name="token-broker-sidecar-\d"/m);
    }
  });

  it('exports auto-instrumented and own spans; deliveries are children of the rotation', async () => {
    // Alice's due rotations (generation 2 onwards: Enroll made generation 1). The first one may
    // come before a sidecar on a busy machine has subscribed (it then gets that generation on
    // subscribing, outside the trace), so take the first one delivered live to both sidecars.
    const rotations = () =>
      receiver
        .spans()
        .filter(
          (s) =>
            s.service === 'token-broker' &&
            s.name === 'broker.rotate' &&
            s.attributes['tb.outcome'] === 'rotated' &&
            Number(s.attributes['tb.generation.to']) >= 2 &&
            s.attributes['tb.demand'] === 'due',
        );
    const deliveriesOf = (rotation: { spanId: string; traceId: string }) =>
      receiver
        .spans()
        .filter(
          (s) =>
            s.name === 'sidecar.deliver' &&
            s.parentSpanId === rotation.spanId &&
            s.traceId === rotation.traceId &&
            s.attributes['tb.outcome'] === 'applied',
        );
    const deliveredToBoth = () =>
      rotations().find((r) => new Set(deliveriesOf(r).map((s) => s.service)).size === 2);
    await eventually(
      () => deliveredToBoth() !== undefined,
      25_000,
      'a due rotation delivered to both sidecars',
    );
    const rotate = deliveredToBoth()!;
    const deliveries = () => deliveriesOf(rotate);
    expect(deliveries()).toHaveLength(2);
    expect(new Set(deliveries().map((s) => s.service))).toEqual(
      new Set(['token-broker-sidecar-0', 'token-broker-sidecar-1']),
    );
    const inTrace = receiver.spans().filter((s) => s.traceId === rotate.traceId);
    const names = new Set(inTrace.map((s) => s.name));
    for (const name of ['lock.acquire', 'lock.release', 'idp.refresh', 'broker.persist', 'POST'])
      expect(names, name).toContain(name);
    // ioredis, loaded by ESM import, is instrumented: the loader hook worked.
    expect(
      inTrace.some((s) => s.name === 'evalsha' && s.attributes['db.system.name'] === 'redis'),
    ).toBe(true);
    const all = receiver.spans();
    expect(
      all.some((s) => s.service === 'token-broker' && s.name === `${GRPC_SERVICE}/Enroll`),
    ).toBe(true);
    // Bob's rotation ended in REAUTH_REQUIRED, and that state reached the sidecars in its trace.
    const reauthDeliveries = () => {
      const reauth = receiver
        .spans()
        .find(
          (s) => s.name === 'broker.rotate' && s.attributes['tb.outcome'] === 'reauth-required',
        );
      return receiver
        .spans()
        .filter((s) => s.name === 'sidecar.deliver' && s.parentSpanId === reauth?.spanId);
    };
    await eventually(() => reauthDeliveries().length === 2, 15_000, 'REAUTH deliveries');
    // grpc-js is instrumented in the sidecar too: a Watch call's span ends with its stream, here
    // when a sidecar stops (it flushes its spans on the way out), and is the parent of the
    // broker's span of that call.
    const leaving = sidecars[1]!.process;
    expect(await leaving.stop()).toBe(0);
    const watchPair = () => {
      const client = receiver
        .spans()
        .find((s) => s.service === 'token-broker-sidecar-1' && s.name === `${GRPC_SERVICE}/Watch`);
      return receiver
        .spans()
        .find(
          (s) =>
            s.service === 'token-broker' &&
            s.name === `${GRPC_SERVICE}/Watch` &&
            client !== undefined &&
            s.parentSpanId === client.spanId,
        );
    };
    await eventually(() => watchPair() !== undefined, 15_000, 'the Watch call on both sides');
  });

  it('exports no token value', () => {
    expect(tokens.size).toBeGreaterThanOrEqual(4);
    const bodies = receiver.raw();
    expect(bodies.length).toBeGreaterThan(0);
    for (const body of bodies) for (const t of tokens) expect(body.includes(t)).toBe(false);
    for (const line of broker.logs.map((l) => JSON.stringify(l)))
      for (const t of tokens) expect(line.includes(t)).toBe(false);
  });

  it('a broker with telemetry on exits on SIGTERM within a couple of seconds, collector gone', async () => {
    await receiver.close();
    // Spans the exporter can no longer deliver.
    await client.getToken(TENANT, ALICE);
    await sleep(50);
    const started = Date.now();
    expect(await broker.stop()).toBe(0);
    expect(Date.now() - started).toBeLessThan(3_000);
  });
});

describe('telemetry off', () => {
  it('is off without OTEL_* variables, and the broker still stops at once', async () => {
    const oidcOff = oidc;
    const plain = await startBrokerProcess(brokerEnv(oidcOff));
    expect(plain.logs.find((l) => l.msg === 'telemetry')).toMatchObject({
      telemetry: 'off',
      reason: expect.stringContaining('off by default') as unknown,
    });
    const started = Date.now();
    expect(await plain.stop()).toBe(0);
    expect(Date.now() - started).toBeLessThan(2_000);
  });
});
