/**
 * The Enroll baseline, in its own process: the least any enrollment must do, with plain ioredis
 * and fetch, at the same concurrency as the broker's load. Per enrollment: take a lock on every
 * Redlock node (SET NX PX, in parallel), one refresh-token POST to the IdP (client_secret_basic),
 * read the session's key on the state node, one MULTI writing a record of the broker's sealed size
 * (HSET), its due-queue entry (ZADD) and an event (PUBLISH), then release every lock (compare and
 * delete, in parallel). No gRPC, no sealing, no auth: the ratio is what the broker's own work costs.
 *
 *   const floor = await startEnrollFloor();
 *   const r = await floor.run({ tokenEndpoint, clientId, clientSecret, stateUrl, lockUrls, ... });
 */
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import { serveWorker, startWorkerProcess, type WorkerProcess } from './worker-process.js';

export interface FloorSpec {
  tokenEndpoint: string;
  clientId: string;
  clientSecret: string;
  stateUrl: string;
  lockUrls: string[];
  concurrency: number;
  ms: number;
  refreshTokens: string[];
  /** Key prefix for what it writes (so nothing collides with the broker's keys). */
  prefix: string;
}

export interface FloorResult {
  calls: number;
  failed: number;
  firstError: string;
  seconds: number;
}

export type EnrollFloor = WorkerProcess<FloorSpec, FloorResult>;

const SELF = fileURLToPath(import.meta.url);

export function startEnrollFloor(): Promise<EnrollFloor> {
  return startWorkerProcess<FloorSpec, FloorResult>(SELF, '--enroll-floor', 'enroll floor');
}

const RELEASE =
  "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

function childMain(): void {
  const connections = new Map<string, Redis>();
  const redis = (url: string) => {
    let c = connections.get(url);
    if (!c) connections.set(url, (c = new Redis(url)));
    return c;
  };
  // A record of the broker's sealed size (a JWE of about 600 bytes, base64url).
  const record = randomBytes(450).toString('base64url');
  const run = async (spec: FloorSpec): Promise<FloorResult> => {
    const state = redis(spec.stateUrl);
    const locks = spec.lockUrls.map(redis);
    const basic = `Basic ${Buffer.from(`${spec.clientId}:${spec.clientSecret}`).toString('base64')}`;
    let next = 0;
    let calls = 0;
    let failed = 0;
    let firstError = '';
    const started = performance.now();
    const until = started + spec.ms;
    const one = async (i: number) => {
      const key = `${spec.prefix}{diku:floor-${i}}`;
      const owner = randomBytes(16).toString('hex');
      await Promise.all(locks.map((l) => l.set(`${key}:lock`, owner, 'PX', 4_000, 'NX')));
      const res = await fetch(spec.tokenEndpoint, {
        method: 'POST',
        headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({
          grant_type: 'refresh_token',
          refresh_token: spec.refreshTokens[i]!,
        }).toString(),
      });
      const body = (await res.json()) as { access_token?: string };
      if (!res.ok || !body.access_token) throw new Error(`IdP answered ${res.status}`);
      await state.hgetall(`${key}:session`);
      await state
        .multi()
        .hset(`${key}:session`, 'record', record, 'generation', '1')
        .zadd(`${spec.prefix}due`, Date.now() + 3_600_000, key)
        .publish(`${spec.prefix}events`, JSON.stringify({ tenant: 'diku', user: `floor-${i}` }))
        .exec();
      await Promise.all(locks.map((l) => l.eval(RELEASE, 1, `${key}:lock`, owner)));
    };
    await Promise.all(
      Array.from({ length: spec.concurrency }, async () => {
        while (performance.now() < until) {
          const i = next++;
          if (i >= spec.refreshTokens.length) return;
          try {
            await one(i);
            calls++;
          } catch (err) {
            failed++;
            firstError ||= (err as Error).message;
          }
        }
      }),
    );
    return { calls, failed, firstError, seconds: (performance.now() - started) / 1_000 };
  };
  serveWorker(run, () => {
    for (const c of connections.values()) c.disconnect();
  });
}

if (process.argv.includes('--enroll-floor')) childMain();
