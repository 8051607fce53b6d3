import { readFileSync } from 'node:fs';
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { WatchError, WatchRequest } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { brokerEnv } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';

const MiB = 1024 * 1024;

function rssMiB(pid: number): number {
  const line = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(line![1]) / 1024;
}

function write(stream: { write: (r: WatchRequest, cb: () => void) => boolean }, r: WatchRequest) {
  return new Promise<void>((resolve) => stream.write(r, resolve));
}

const subscribe = (tenant: string, user: string): WatchRequest => ({
  action: { $case: 'subscribe', value: { tenant, user, afterGeneration: 0, epoch: '' } },
});

describe('Watch against a peer that never reads', () => {
  let oidc: OidcProviderHarness;
  let broker: BrokerProcess;

  beforeAll(async () => {
    oidc = await startOidcProvider();
    broker = await startBrokerProcess(
      brokerEnv(oidc, undefined, { TB_WATCH_MAX_SUBSCRIPTIONS: '100' }),
    );
  }, 60_000);

  afterAll(async () => {
    await broker?.stop();
    await oidc?.close();
  });

  it('keeps memory bounded, ends the stream RESOURCE_EXHAUSTED and gives the memory back', async () => {
    const client = new BrokerClient(broker.address);
    const stream = client.raw.watch();
    stream.pause();
    const ended = new Promise<ServiceError>((resolve) => stream.on('error', resolve));
    const before = rssMiB(broker.pid);
    let peak = before;
    // 250 distinct invalid tenants of 1 MiB each, then small distinct invalid ones: never read.
    for (let i = 0; i < 250; i++) {
      await write(stream, subscribe(`${i}:${'x'.repeat(MiB)}`, 'u'));
      peak = Math.max(peak, rssMiB(broker.pid));
    }
    for (let i = 0; i < 3000; i++) {
      await write(stream, subscribe(`bad\u0001${i}`, 'u'));
      if (i % 100 === 0) peak = Math.max(peak, rssMiB(broker.pid));
    }
    peak = Math.max(peak, rssMiB(broker.pid));
    // Before the bound, every WatchError echoed its 1 MiB tenant: RSS grew by about 500 MiB.
    expect(peak - before).toBeLessThan(150);
    await eventually(
      () => broker.logs.some((l) => String(l.msg).startsWith('watch stream ended')),
      20_000,
      'the overflow log line',
    );

    stream.resume();
    const status = await ended;
    expect(status.code).toBe(GrpcStatus.RESOURCE_EXHAUSTED);

    // A reading peer gets a short WatchError for a 1 MiB value, never the value.
    const watcher = client.watch();
    watcher.subscribe(`0:${'x'.repeat(MiB)}`, 'u');
    await watcher.until(() => watcher.errors.length > 0, 10_000, 'the WatchError');
    const big: WatchError = watcher.errors[0]!;
    expect(JSON.stringify(big).length).toBeLessThan(400);
    expect(big.tenant.length).toBeLessThanOrEqual(65);
    expect(big.message).toContain('(got 1048578)');
    watcher.close();
    client.close();

    await eventually(
      () => rssMiB(broker.pid) < before + 60,
      30_000,
      'broker RSS back near its level before the stream',
    );
  }, 120_000);

  it('refuses a subscription past TB_WATCH_MAX_SUBSCRIPTIONS and keeps the stream', async () => {
    const client = new BrokerClient(broker.address);
    const watcher = client.watch();
    for (let i = 0; i < 101; i++) watcher.subscribe('diku', `user-${i}`);
    await watcher.until(() => watcher.errors.length >= 101, 10_000, '101 answers');
    const refused = watcher.errors.filter((e) => e.code === 'RESOURCE_EXHAUSTED');
    expect(refused.map((e) => e.user)).toEqual(['user-100']);
    expect(refused[0]!.message).toContain('TB_WATCH_MAX_SUBSCRIPTIONS');
    // A freed slot is usable again: the stream lives on.
    watcher.unsubscribe('diku', 'user-0');
    watcher.subscribe('diku', 'user-100');
    await watcher.until(
      () => watcher.errors.some((e) => e.user === 'user-100' && e.code === 'SESSION_NOT_FOUND'),
      10_000,
      'the freed slot taken',
    );
    expect(watcher.ended).toBe(false);
    watcher.close();
    client.close();
  }, 60_000);
});
