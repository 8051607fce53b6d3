/**
 * `make demo`: the mission on one machine. A real OIDC provider with refresh-token rotation and
 * short-lived JWT access tokens, a resource server that checks each token with zero clock
 * tolerance, and three modules running one long "data import" for the same user.
 *
 *   MODE=broker (default): the broker owns the user's refresh token; each module reads its access
 *     token from its own sidecar on localhost and never refreshes.
 *   MODE=naive: each module holds the user's token pair and refreshes it itself, as in-process
 *     token libraries do. They race on the single-use refresh token.
 *
 * DEMO_SECONDS (default 60) and DEMO_AT_TTL (access-token lifetime in seconds, default 10) set the
 * pace. With TB_REDIS_URL (and TB_REDLOCK_URLS, TB_SEALING_KEYS) the broker uses Redis instead
 * of its embedded mode. Exits 0 only if no resource call was rejected.
 */
import { pino } from 'pino';
import { startBroker, type RunningBroker } from '../broker/broker-app.js';
import { loadConfig } from '../broker/config.js';
import { loadSidecarConfig } from '../sidecar/config.js';
import { startSidecar, type RunningSidecar } from '../sidecar/sidecar-app.js';
import { MetricSnapshot } from '../shared/telemetry/metric-snapshot.js';
import { BrokerClient, devClientTransport } from './dev/broker-client.js';
import { devIdentity } from './dev/dev-identity.js';
import { startOidcProvider, type OidcProviderHarness } from './dev/oidc-provider.js';
import { startResourceServer } from './dev/resource-server.js';

const MODE = process.env.MODE === 'naive' ? 'naive' : 'broker';
const SECONDS = positive('DEMO_SECONDS', 60);
const AT_TTL = positive('DEMO_AT_TTL', 10);
const MODULES = ['mod-data-import', 'mod-inventory', 'mod-source-record-storage'];
const TENANT = 'diku';
const USER = 'librarian';
const AUDIENCE = 'urn:demo:resource';
const CALL_INTERVAL_MS = 100;

function positive(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) {
    console.error(`${name} must be a positive number of seconds, got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return value;
}

interface Tally {
  records: number;
  accepted: number;
  rejected: number;
  invalidGrant: number;
  tokenErrors: number;
}

const tally: Tally = { records: 0, accepted: 0, rejected: 0, invalidGrant: 0, tokenErrors: 0 };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const oidc = await startOidcProvider({
  accessTokenTtlSeconds: AT_TTL,
  jwtAccessTokens: { audience: AUDIENCE },
});
const resource = await startResourceServer({
  issuer: oidc.issuer,
  jwksUri: `${oidc.issuer}/jwks`,
  audience: AUDIENCE,
});
const quiet = pino({ level: 'silent' });

/** Calls the protected resource with `token`; true when accepted. */
async function callResource(token: string): Promise<boolean> {
  const res = await fetch(resource.url, { headers: { authorization: `Bearer ${token}` } });
  await res.arrayBuffer();
  return res.ok;
}

/** A module in broker mode: reads its AT from its sidecar; on a 401 asks for a newer one. */
async function brokerModule(port: number, until: number): Promise<void> {
  const base = `http://127.0.0.1:${port}/v1/tokens/${TENANT}/${USER}`;
  const headers = { 'x-token-broker': 'true' };
  let minGeneration = 0;
  while (Date.now() < until) {
    const query = minGeneration ? `?min_generation=${minGeneration}&wait=5000` : '?wait=5000';
    const res = await fetch(base + query, { headers });
    if (!res.ok) {
      tally.tokenErrors++;
      await res.arrayBuffer();
      await sleep(500);
      continue;
    }
    const body = (await res.json()) as { access_token: string; generation: number };
    if (await callResource(body.access_token)) {
      tally.accepted++;
      tally.records++;
      minGeneration = 0;
    } else {
      tally.rejected++;
      minGeneration = body.generation + 1;
    }
    await sleep(CALL_INTERVAL_MS);
  }
}

/** A module in naive mode: holds the token pair and refreshes it itself before expiry. */
async function naiveModule(
  provider: OidcProviderHarness,
  start: { access: string; refresh: string; expiresAt: number },
  until: number,
): Promise<void> {
  let { access, refresh, expiresAt } = start;
  while (Date.now() < until) {
    if (expiresAt - Date.now() < AT_TTL * 250) {
      // The textbook client: refresh when a quarter of the lifetime is left.
      const res = await provider.postToken({ grant_type: 'refresh_token', refresh_token: refresh });
      const body = (await res.json()) as {
        access_token?: string;
        refresh_token?: string;
        expires_in?: number;
        error?: string;
      };
      if (res.ok && body.access_token && body.refresh_token) {
        access = body.access_token;
        refresh = body.refresh_token;
        expiresAt = Date.now() + (body.expires_in ?? AT_TTL) * 1000;
      } else if (body.error === 'invalid_grant') tally.invalidGrant++;
    }
    if (await callResource(access)) {
      tally.accepted++;
      tally.records++;
    } else tally.rejected++;
    await sleep(CALL_INTERVAL_MS);
  }
}

function bar(fraction: number, width = 24): string {
  const filled = Math.round(Math.min(1, fraction) * width);
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}

function statusLine(started: number, rotations: number): string {
  const elapsed = (Date.now() - started) / 1000;
  return (
    `${bar(elapsed / SECONDS)} ${elapsed.toFixed(0).padStart(3)}/${SECONDS}s  ` +
    `records ${tally.records}  accepted ${tally.accepted}  rejected ${tally.rejected}  ` +
    `rotations ${rotations}  IdP refreshes ${oidc.counters.refreshes}  ` +
    `invalid_grant ${oidc.counters.invalidGrants}`
  );
}

console.log(
  `token-broker demo, MODE=${MODE}: ${MODULES.length} modules import records for ` +
    `${TENANT}/${USER} for ${SECONDS}s; access tokens live ${AT_TTL}s, refresh tokens are ` +
    `single-use (reuse revokes the whole family).`,
);

let broker: RunningBroker | undefined;
// The broker's own instruments, read back for the status line and the summary.
const brokerMetrics = new MetricSnapshot();
const sidecars: RunningSidecar[] = [];
const minted = await oidc.mintTokens(USER);
const started = Date.now();
const until = started + SECONDS * 1000;
let jobs: Promise<void>[];
if (MODE === 'broker') {
  broker = await startBroker(
    loadConfig({
      TB_GRPC_ADDRESS: '127.0.0.1:0',
      TB_IDP_ISSUER: oidc.issuer,
      TB_IDP_CLIENT_ID: oidc.clients.basic.clientId,
      TB_IDP_CLIENT_SECRET: oidc.clients.basic.clientSecret,
      TB_REFRESH_MIN_LEAD_MS: String(Math.min(10_000, AT_TTL * 250)),
      TB_REDIS_URL: process.env.TB_REDIS_URL,
      TB_REDLOCK_URLS: process.env.TB_REDLOCK_URLS,
      TB_SEALING_KEYS: process.env.TB_SEALING_KEYS,
      TB_LOG_LEVEL: 'error',
      // TLS and caller authentication on, as in a cluster: a dev CA, a service-account issuer's
      // keys and an access policy (scripts/dev/dev-identity.ts).
      ...devIdentity().brokerEnv(),
    }),
    pino({ level: 'error' }),
    { meter: brokerMetrics.meter },
  );
  const client = new BrokerClient(`127.0.0.1:${broker.port}`, devClientTransport('demo-login'));
  await client.enroll(TENANT, USER, minted.refresh_token);
  client.close();
  for (const module of MODULES) {
    sidecars.push(
      await startSidecar(
        loadSidecarConfig({
          TB_SIDECAR_BROKER_ADDRESS: `127.0.0.1:${broker.port}`,
          // Each module's sidecar presents its own pod's ServiceAccount token over TLS.
          ...devIdentity().sidecarEnv(module),
          TB_SIDECAR_PORT: '0',
          TB_SIDECAR_USERS: `${TENANT}/${USER}`,
          TB_SIDECAR_SAFETY_SKEW_MS: String(Math.min(10_000, AT_TTL * 100)),
        }),
        quiet.child({ module }),
      ),
    );
  }
  jobs = sidecars.map((sidecar) => brokerModule(sidecar.port!, until));
} else {
  const start = {
    access: minted.access_token,
    refresh: minted.refresh_token,
    expiresAt: Date.now() + minted.expires_in * 1000,
  };
  jobs = MODULES.map(() => naiveModule(oidc, start, until));
}

const tty = process.stdout.isTTY;
let lastPrinted = 0;
const ticker = setInterval(async () => {
  const rotations = broker
    ? await brokerMetrics.value('tb_broker_rotations', { outcome: 'rotated' })
    : oidc.counters.refreshes;
  if (tty) process.stdout.write(`\r${statusLine(started, rotations)}`);
  else if (Date.now() - lastPrinted >= 5_000) {
    lastPrinted = Date.now();
    console.log(statusLine(started, rotations));
  }
}, 250);
await Promise.all(jobs);
clearInterval(ticker);
if (tty) process.stdout.write('\n');

const rotations = broker
  ? await brokerMetrics.value('tb_broker_rotations', { outcome: 'rotated' })
  : oidc.counters.refreshes;
for (const sidecar of sidecars) await sidecar.stop();
await broker?.stop();
await resource.close();
await oidc.close();

const c = oidc.counters;
console.log(
  `summary: mode=${MODE} records=${tally.records} accepted=${tally.accepted} ` +
    `rejected=${tally.rejected} idp_refreshes=${c.refreshes} rotations=${rotations} ` +
    `invalid_grant=${c.invalidGrants} reused_refresh_tokens=${c.reuses} ` +
    `revoked_grants=${c.revokedGrants}`,
);
if (tally.rejected > 0)
  console.log(
    MODE === 'naive'
      ? 'The modules raced on one single-use refresh token: the IdP saw a reuse, revoked the ' +
          'family, and every call after that was rejected. Run `make demo` to see the broker fix it.'
      : 'Some calls were rejected: see the counters above.',
  );
else console.log('No call was rejected: one owner refreshed the token, every module kept working.');
process.exit(tally.rejected === 0 ? 0 : 1);
