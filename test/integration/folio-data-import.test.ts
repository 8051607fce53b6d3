/**
 * FOLIO's data-import scenario against the mod-login emulator (access tokens live 3 s):
 * a job of thousands of records flows through 3 modules, each of which calls a protected FOLIO
 * endpoint for every record with the user's access token, for more than 5 token lifetimes, while
 * the user's browser session refreshes its own family and logs out mid-job.
 *
 * With the broker: 2 broker processes (4 Redis nodes: state + 3 Redlock), one sidecar process per
 * module. The job completes with 0 x 401, 0 reuse, and exactly one IdP refresh per generation.
 * Naive: each module refreshes the shared token pair itself; the emulator sees a reused refresh
 * token, revokes the user's tokens, and the job fails with 401s.
 */
import { setTimeout as sleep } from 'node:timers/promises';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, eventually } from '../../scripts/dev/broker-client.js';
import { redisTopology } from '../../scripts/dev/broker-env.js';
import { startBrokerProcess, type BrokerProcess } from '../../scripts/dev/broker-process.js';
import {
  folioBrokerEnv,
  startFolioEmulator,
  type FolioEmulator,
  type FolioPair,
} from '../harness/folio-emulator.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';
import {
  startSidecarProcess,
  type SidecarProcess,
  type TokenBody,
} from '../../scripts/dev/sidecar-process.js';

const TENANT = 'diku';
const PASSWORD = 'pw-FAKE-diku-admin';
const AT_TTL_S = 3;
const TOKEN_EXPIRATION = `accessToken:${AT_TTL_S},refreshToken:600`;
const RECORDS = 3_200;
const RECORDS_PER_S = 200;
/** Records a module handles per token read (a chunk, as data import processes them). */
const CHUNK = 10;
const MODULES = ['mod-source-record-storage', 'mod-inventory', 'mod-invoice'];
const SKEW_MS = 500;

/** Where a module gets its access token from. */
type TokenSource = () => Promise<{ token: string; generation: number }>;

interface JobResult {
  done: number;
  failed: number;
  unauthorized: number;
  elapsedMs: number;
  /** Per module, the generation of each token it used, in order. */
  generations: number[][];
}

/**
 * Runs the import: records enter the first module at RECORDS_PER_S; each module takes the
 * records waiting for it, reads its token, calls the protected endpoint for each record with it,
 * and hands the accepted ones on. Stops when every record is done or failed, or early once
 * `abortAfterFailures` records failed (the job is marked failed, as data import does).
 */
async function runImportJob(
  folio: FolioEmulator,
  sources: TokenSource[],
  options: { abortAfterFailures?: number; onTick?: (elapsedMs: number, done: number) => void } = {},
): Promise<JobResult> {
  const queues: number[][] = sources.map(() => []);
  const generations: number[][] = sources.map(() => []);
  let done = 0;
  let failed = 0;
  let unauthorized = 0;
  let aborted = false;
  const start = performance.now();
  const finished = () => aborted || done + failed >= RECORDS;

  const producer = (async () => {
    for (let i = 0; i < RECORDS && !aborted; i++) {
      const due = start + (i * 1000) / RECORDS_PER_S;
      const wait = due - performance.now();
      if (wait > 0) await sleep(wait);
      queues[0]!.push(i);
    }
  })();
  const modules = sources.map(async (source, m) => {
    while (!finished()) {
      const chunk = queues[m]!.splice(0, CHUNK);
      if (chunk.length === 0) {
        await sleep(5);
        continue;
      }
      const { token, generation } = await source();
      generations[m]!.push(generation);
      const statuses = await Promise.all(chunk.map(() => folio.callProtected(TENANT, token)));
      statuses.forEach((status, k) => {
        if (status === 200) {
          if (m + 1 < sources.length) queues[m + 1]!.push(chunk[k]!);
          else done++;
        } else {
          failed++;
          if (status === 401) unauthorized++;
        }
      });
      if (options.abortAfterFailures !== undefined && failed >= options.abortAfterFailures)
        aborted = true;
    }
  });
  const ticker = (async () => {
    while (!finished()) {
      options.onTick?.(performance.now() - start, done);
      await sleep(100);
    }
  })();
  await Promise.all([producer, ...modules, ticker]);
  return { done, failed, unauthorized, elapsedMs: performance.now() - start, generations };
}

/**
 * The user's browser (FOLIO's R environment): refreshes its own family on a timer, and logs out
 * when `logoutNow()` says so; then tries its dead refresh token once, as a stale tab would.
 */
function runBrowser(
  folio: FolioEmulator,
  first: FolioPair,
  user: string,
  logoutNow: () => boolean,
) {
  const state = {
    pair: first,
    attempts: 0,
    rejected: 0,
    logoutStatus: 0,
    afterLogoutStatus: 0,
    stopped: false,
  };
  const loop = (async () => {
    while (!state.stopped && state.logoutStatus === 0) {
      await sleep(1_000);
      if (logoutNow()) {
        state.logoutStatus = await folio.logout(TENANT, state.pair.refreshToken);
        state.attempts++;
        state.afterLogoutStatus = (await folio.refresh(TENANT, state.pair.refreshToken)).status;
        if (state.afterLogoutStatus !== 201) state.rejected++;
        return;
      }
      state.attempts++;
      const next = await folio.refresh(TENANT, state.pair.refreshToken);
      if ('refreshToken' in next) state.pair = next;
      else state.rejected++;
    }
  })();
  return { state, done: loop, user };
}

let redis: RedisNodes;
beforeAll(async () => {
  redis = await startRedisNodes(4);
});
afterAll(async () => {
  await redis?.stopAll();
});

describe('FOLIO data import over 5+ access-token lifetimes', () => {
  let folio: FolioEmulator;
  const brokers: BrokerProcess[] = [];
  const sidecars: SidecarProcess[] = [];
  afterAll(async () => {
    await Promise.all(sidecars.map((s) => s.kill()));
    await Promise.all(brokers.map((b) => b.kill()));
    await folio?.close();
  });

  it('completes through the broker and 3 sidecars: 0 x 401, 0 reuse, one refresh per generation, browser logout harmless', async () => {
    const user = 'diku_admin';
    folio = await startFolioEmulator({ tokenExpiration: TOKEN_EXPIRATION });
    folio.addUser(TENANT, user, PASSWORD);
    const env = folioBrokerEnv(folio, redisTopology(redis.urls), { TB_REFRESH_RATIO: '0.5' });
    brokers.push(...(await Promise.all([startBrokerProcess(env), startBrokerProcess(env)])));

    // The user works in the browser (a family of its own) and starts an import: the job gets
    // a dedicated pair, whose refresh token is handed to the broker and never used again.
    const browserLogin = await folio.login(TENANT, user, PASSWORD);
    const jobPair = await folio.login(TENANT, user, PASSWORD);
    const client = new BrokerClient(brokers[0]!.address);
    const enrolled = (await client.enroll(TENANT, user, jobPair.refreshToken)).session!;
    expect(enrolled.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);

    const address = `ipv4:${brokers.map((b) => b.address).join(',')}`;
    sidecars.push(
      ...(await Promise.all(
        MODULES.map(() =>
          startSidecarProcess({
            TB_SIDECAR_BROKER_ADDRESS: address,
            TB_SIDECAR_SAFETY_SKEW_MS: String(SKEW_MS),
            TB_SIDECAR_USERS: `${TENANT}/${user}`,
            TB_SIDECAR_RECONNECT_MAX_MS: '1000',
          }),
        ),
      )),
    );
    for (const s of sidecars)
      await eventually(async () => (await s.get('/readyz')).status === 200, 20_000, 'ready');

    const served = new Set<string>();
    let sidecarErrors = 0;
    const sources: TokenSource[] = sidecars.map((sidecar) => async () => {
      const res = await sidecar.token(TENANT, user, { wait: 2_000 });
      if (res.status !== 200) {
        sidecarErrors++;
        await res.arrayBuffer();
        return { token: '', generation: -1 };
      }
      const body = (await res.json()) as TokenBody;
      served.add(body.access_token);
      return { token: body.access_token, generation: body.generation };
    });

    let elapsed = 0;
    let doneAtLogout = -1;
    const browser = runBrowser(folio, browserLogin, user, () => {
      if (elapsed < (RECORDS / RECORDS_PER_S) * 500) return false;
      return true;
    });
    const job = await runImportJob(folio, sources, {
      onTick: (ms, done) => {
        elapsed = ms;
        if (browser.state.logoutStatus !== 0 && doneAtLogout < 0) doneAtLogout = done;
      },
    });
    browser.state.stopped = true;
    await browser.done;

    // The job: every record through all 3 modules, never a 401, over 5+ AT lifetimes.
    expect(job.failed).toBe(0);
    expect(job.unauthorized).toBe(0);
    expect(job.done).toBe(RECORDS);
    expect(sidecarErrors).toBe(0);
    expect(folio.counters.protectedRejected).toBe(0);
    expect(folio.counters.protectedAccepted).toBe(RECORDS * MODULES.length);
    expect(job.elapsedMs).toBeGreaterThanOrEqual(5 * AT_TTL_S * 1000);
    for (const used of job.generations) {
      for (let i = 1; i < used.length; i++) expect(used[i]!).toBeGreaterThanOrEqual(used[i - 1]!);
      expect(new Set(used).size).toBeGreaterThanOrEqual(5);
    }

    // The browser logged out mid-job, of its own family only.
    expect(browser.state.logoutStatus).toBe(204);
    expect(browser.state.afterLogoutStatus).toBe(422);
    expect(doneAtLogout).toBeGreaterThan(0);
    expect(doneAtLogout).toBeLessThan(RECORDS);

    // The job ends: revoking stops the broker's refreshes. Then, at the IdP: no reuse, and one
    // refresh of the broker's family per generation (the enrollment's rotation made generation 1).
    const revoked = (await client.revoke(TENANT, user)).session!;
    client.close();
    const brokerRefreshes = folio.refreshesInFamilyOf(jobPair.refreshToken);
    expect(folio.counters.reuses).toBe(0);
    expect(folio.counters.revocations).toBe(0);
    expect(brokerRefreshes).toBe(revoked.generation - 1);
    expect(brokerRefreshes).toBeGreaterThanOrEqual(5);
    // Every refresh request the IdP saw was the broker's or the browser's, and only the
    // browser's request after its logout was refused.
    expect(folio.counters.refreshRequests).toBe(brokerRefreshes + browser.state.attempts);
    expect(folio.counters.refreshRejections).toBe(browser.state.rejected);
    expect(browser.state.rejected).toBe(1);

    // No token value in any broker or sidecar output.
    const secrets = [...served, jobPair.refreshToken, browserLogin.refreshToken];
    const output = [
      ...brokers.map((b) => JSON.stringify(b.logs)),
      ...sidecars.map((s) => s.output()),
    ].join('\n');
    expect(secrets.filter((s) => s !== '' && output.includes(s))).toHaveLength(0);
  }, 120_000);

  it('fails in naive mode, each module refreshing the shared pair itself: reuse, revocation, 401s', async () => {
    const naive = await startFolioEmulator({ tokenExpiration: TOKEN_EXPIRATION });
    try {
      const user = 'naive_admin';
      naive.addUser(TENANT, user, PASSWORD);
      const browserLogin = await naive.login(TENANT, user, PASSWORD);
      const jobPair = await naive.login(TENANT, user, PASSWORD);
      let refreshFailures = 0;
      // Each module starts with the job's pair and refreshes it when it is about to expire.
      const sources: TokenSource[] = MODULES.map(() => {
        let held = {
          token: jobPair.accessToken,
          refreshToken: jobPair.refreshToken,
          expiresAt: Date.parse(String(jobPair.body.accessTokenExpiration)),
          generation: 0,
        };
        let refreshing: Promise<void> | undefined;
        return async () => {
          if (held.expiresAt - Date.now() < SKEW_MS && held.refreshToken !== '') {
            refreshing ??= (async () => {
              const next = await naive.refresh(TENANT, held.refreshToken);
              if ('refreshToken' in next) {
                held = {
                  token: next.accessToken,
                  refreshToken: next.refreshToken,
                  expiresAt: Date.parse(String(next.body.accessTokenExpiration)),
                  generation: held.generation + 1,
                };
              } else {
                refreshFailures++;
                held = { ...held, refreshToken: '' };
              }
            })().finally(() => (refreshing = undefined));
            await refreshing;
          }
          return { token: held.token, generation: held.generation };
        };
      });

      const job = await runImportJob(naive, sources, { abortAfterFailures: 100 });

      expect(naive.counters.reuses).toBeGreaterThanOrEqual(1);
      expect(naive.counters.revocations).toBeGreaterThanOrEqual(1);
      expect(refreshFailures).toBeGreaterThanOrEqual(1);
      expect(job.unauthorized).toBeGreaterThan(0);
      expect(naive.counters.protectedRejected).toBeGreaterThan(0);
      expect(job.done).toBeLessThan(RECORDS);
      // The reuse logged the user out everywhere: the browser's own family is dead too.
      expect((await naive.refresh(TENANT, browserLogin.refreshToken)).status).toBe(422);
    } finally {
      await naive.close();
    }
  }, 60_000);
});
