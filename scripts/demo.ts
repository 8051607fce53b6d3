/**
 * A short look at the mission: a real OIDC provider with refresh-token rotation and 10-second
 * access tokens, an embedded broker, and watchers printing every rotation. Ends with a summary;
 * exits 0 only if no refresh token was presented twice.
 */
import { pino } from 'pino';
import { startBroker } from '../broker/broker-app.js';
import { loadConfig } from '../broker/config.js';
import { BrokerClient } from '../test/harness/broker-client.js';
import { startOidcProvider } from '../test/harness/oidc-provider.js';

const seconds = Number(process.env.DEMO_SECONDS ?? 30);
const users = ['ada', 'grace', 'linus'];

const oidc = await startOidcProvider({ accessTokenTtlSeconds: 10 });
const broker = await startBroker(
  loadConfig({
    TB_GRPC_ADDRESS: '127.0.0.1:0',
    TB_IDP_ISSUER: oidc.issuer,
    TB_IDP_CLIENT_ID: oidc.clients.basic.clientId,
    TB_IDP_CLIENT_SECRET: oidc.clients.basic.clientSecret,
    TB_REFRESH_MIN_LEAD_MS: '2000',
  }),
  pino({ level: 'error' }),
);
const client = new BrokerClient(`127.0.0.1:${broker.port}`);
console.log(`IdP ${oidc.issuer} (AT lifetime 10 s, RT rotation on); broker on port ${broker.port}`);
for (const user of users) {
  const minted = await oidc.mintTokens(user);
  await client.enroll('demo', user, minted.refresh_token);
}
const watcher = client.watch();
for (const user of users) watcher.subscribe('demo', user);
const started = Date.now();
const seen = new Set<string>();
watcher.stream.on('data', () => {
  for (const user of users) {
    const latest = watcher.latest('demo', user);
    if (!latest || seen.has(`${user}:${latest.generation}`)) continue;
    seen.add(`${user}:${latest.generation}`);
    const t = ((Date.now() - started) / 1000).toFixed(1).padStart(5);
    const left = ((latest.expiresAt!.getTime() - Date.now()) / 1000).toFixed(1);
    console.log(`${t}s  ${user.padEnd(6)} generation ${latest.generation}  AT valid ${left}s more`);
  }
});
await new Promise((r) => setTimeout(r, seconds * 1000));
watcher.close();
client.close();
await broker.stop();
await oidc.close();
const c = oidc.counters;
console.log(
  `summary: ${broker.stats.rotations} rotations, ${c.refreshes} IdP refreshes, ` +
    `${c.reuses} refresh tokens reused, ${c.revokedGrants} grants revoked`,
);
process.exit(c.reuses === 0 && c.revokedGrants === 0 && broker.stats.rotations > 0 ? 0 : 1);
