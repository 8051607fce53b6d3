/**
 * The same-run baseline of bench/rotation.ts: the essential work of one rotation, done bare, in
 * its own process, at a fixed concurrency, as fast as it can. Fixed definition (keep it so, or the
 * ratios of older runs mean nothing). One rotation of session i is, in this order:
 *
 *   1. lock:     SET <lock:i> <random> NX PX 4000 on every lock node, at once (Redlock acquire)
 *   2. read:     HGET <session:i> sealed on the state node (the record: plain JSON here)
 *   3. IdP:      one POST grant_type=refresh_token to the token endpoint, client_secret_basic,
 *                its JSON answer parsed (mode 'fetch': global fetch, as the issue's baseline;
 *                mode 'http': node:http with a keep-alive agent; mode 'redis-only': skipped, the
 *                refresh token kept, so only the Redis commands are left)
 *   4. write:    HSET <session:i> gen <n> sealed <json>, ZADD <due> <next due> i and
 *                PUBLISH <events> {session, generation}, pipelined in one round trip
 *   5. release:  EVAL compare-and-delete on every lock node, at once
 *
 * No sealing, no policy, no telemetry, no gRPC: what any correct broker must do per rotation.
 * Each worker takes the next session round robin, so no session is rotated twice at once.
 *
 *   node --import tsx bench/lib/bare-rotation-loop.ts '<json: BareLoopOptions>'
 *
 * Prints one line `ready` once connected and seeded, then waits for a line on stdin to start,
 * runs `seconds`, prints one JSON line (BareLoopResult) and exits.
 */
import { randomBytes } from 'node:crypto';
import { Agent, request } from 'node:http';
import { createInterface } from 'node:readline';
import { Redis } from 'ioredis';

export interface BareLoopOptions {
  mode: 'fetch' | 'http' | 'redis-only';
  stateUrl: string;
  lockUrls: string[];
  tokenEndpoint: string;
  clientId: string;
  clientSecret: string;
  /** Sessions: each gets a fresh token family from the fast IdP (its /admin/mint). */
  sessions: number;
  concurrency: number;
  seconds: number;
  prefix: string;
}

export interface BareLoopResult {
  rotations: number;
  failures: number;
  seconds: number;
  /** This process' CPU seconds while it ran (process.cpuUsage). */
  cpuSeconds: number;
}

const RELEASE = `if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end`;

async function main(options: BareLoopOptions): Promise<void> {
  const state = new Redis(options.stateUrl);
  const locks = options.lockUrls.map((url) => new Redis(url));
  const basic = `Basic ${Buffer.from(`${options.clientId}:${options.clientSecret}`).toString('base64')}`;
  const agent = new Agent({ keepAlive: true, maxSockets: options.concurrency });
  const endpoint = new URL(options.tokenEndpoint);
  const p = options.prefix;
  const n = options.sessions;
  const mintUrl = new URL(`/admin/mint?count=${n}`, options.tokenEndpoint);
  const refreshTokens = (await (await fetch(mintUrl, { method: 'POST' })).json()) as string[];
  const sessionKey = (i: number) => `${p}session:${i}`;
  // Seed the records.
  const seed = state.pipeline();
  refreshTokens.forEach((rt, i) =>
    seed.hset(sessionKey(i), 'gen', '1', 'sealed', record(i, 1, rt, 'at.seed')),
  );
  await seed.exec();

  const postFetch = async (refreshToken: string): Promise<TokenAnswer> => {
    const res = await fetch(options.tokenEndpoint, {
      method: 'POST',
      headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
      body: `grant_type=refresh_token&refresh_token=${encodeURIComponent(refreshToken)}`,
    });
    const body = (await res.json()) as TokenAnswer;
    if (!res.ok) throw new Error(`IdP ${res.status}`);
    return body;
  };
  const postHttp = (refreshToken: string): Promise<TokenAnswer> =>
    new Promise((resolve, reject) => {
      const body = `grant_type=refresh_token&refresh_token=${encodeURIComponent(refreshToken)}`;
      const req = request(
        {
          agent,
          host: endpoint.hostname,
          port: endpoint.port,
          path: endpoint.pathname,
          method: 'POST',
          headers: {
            authorization: basic,
            'content-type': 'application/x-www-form-urlencoded',
            'content-length': Buffer.byteLength(body),
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            if (res.statusCode !== 200) return reject(new Error(`IdP ${res.statusCode}`));
            resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')) as TokenAnswer);
          });
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.end(body);
    });

  const rotateOnce = async (i: number): Promise<void> => {
    const lockKey = `${p}lock:{${i}}`;
    const value = randomBytes(16).toString('hex');
    const acquired = await Promise.all(
      locks.map((l) => l.set(lockKey, value, 'PX', 4_000, 'NX').catch(() => null)),
    );
    if (acquired.filter((a) => a === 'OK').length <= locks.length / 2) throw new Error('no quorum');
    try {
      const sealed = await state.hget(sessionKey(i), 'sealed');
      const current = JSON.parse(sealed!) as { gen: number; rt: string };
      let rt = current.rt;
      let at = 'at.none';
      if (options.mode !== 'redis-only') {
        const answer = await (options.mode === 'fetch' ? postFetch(rt) : postHttp(rt));
        rt = answer.refresh_token;
        at = answer.access_token;
      }
      const gen = current.gen + 1;
      const now = Date.now();
      await Promise.all([
        state.hset(sessionKey(i), 'gen', String(gen), 'sealed', record(i, gen, rt, at)),
        state.zadd(`${p}due`, now + 1_500, String(i)),
        state.publish(`${p}events`, JSON.stringify({ session: String(i), generation: gen })),
      ]);
    } finally {
      await Promise.all(locks.map((l) => l.eval(RELEASE, 1, lockKey, value).catch(() => 0)));
    }
  };

  process.stdout.write('ready\n');
  await new Promise<void>((resolve) =>
    createInterface({ input: process.stdin }).once('line', () => resolve()),
  );

  let next = 0;
  let rotations = 0;
  let failures = 0;
  const cpu = process.cpuUsage();
  const started = performance.now();
  const until = started + options.seconds * 1_000;
  await Promise.all(
    Array.from({ length: options.concurrency }, async () => {
      while (performance.now() < until) {
        const i = next++ % n;
        try {
          await rotateOnce(i);
          rotations++;
        } catch {
          failures++;
        }
      }
    }),
  );
  const seconds = (performance.now() - started) / 1_000;
  const used = process.cpuUsage(cpu);
  const result: BareLoopResult = {
    rotations,
    failures,
    seconds,
    cpuSeconds: (used.user + used.system) / 1e6,
  };
  process.stdout.write(`${JSON.stringify(result)}\n`);
  agent.destroy();
  await Promise.all([state, ...locks].map((r) => r.quit()));
}

interface TokenAnswer {
  access_token: string;
  refresh_token: string;
  expires_in: number;
}

/** A record about the size of a sealed one (~400 bytes). */
function record(i: number, gen: number, rt: string, at: string): string {
  return JSON.stringify({
    gen,
    rt,
    at,
    tenant: 'bench',
    user: `user-${i}`,
    idp: 'default',
    status: 'ACTIVE',
    issuedAt: Date.now(),
    accessExpiresAt: Date.now() + 2_000,
    pad: 'x'.repeat(200),
  });
}

await main(JSON.parse(process.argv[2]!) as BareLoopOptions);
