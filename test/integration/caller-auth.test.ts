/**
 * Who may read whose token (promise 8), against a real broker over real TLS: a Kubernetes-like
 * service-account issuer over HTTPS (discovery and JWKS behind a bearer token, as the API server
 * serves them), projected-token claims, a policy file, real Redis and a real OIDC provider.
 */
import { connect, type PeerCertificate } from 'node:tls';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import * as grpc from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SessionStatus } from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, eventually, rpcError } from '../../scripts/dev/broker-client.js';
import { brokerEnv, redisTopology, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';
import type { ClientTransportSettings } from '../../shared/grpc-client-credentials.js';
import { loadSidecarConfig } from '../../sidecar/config.js';
import { startSidecar, type RunningSidecar } from '../../sidecar/sidecar-app.js';
import { K8sIssuer } from '../harness/k8s-issuer.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';
import { makeCa, makeLeaf, type TestCa, type TestLeaf } from '../harness/test-certs.js';

const DISCOVERY_BEARER = 'broker-discovery-bearer-FAKE';
const SERVER_NAME = 'token-broker.tb.svc';

let redis: RedisNodes;
let oidc: OidcProviderHarness;
let k8s: K8sIssuer;
let ca: TestCa;
let otherCa: TestCa;
let leaf: TestLeaf;
let dir: string;
let tlsDir: string;
let policyFile: string;
let broker: Awaited<ReturnType<typeof startInProcessBroker>>;
const logLines: string[] = [];
/** Every token handed out in this file, so no log line may contain one. */
const secrets: string[] = [DISCOVERY_BEARER];

const POLICY_A = `rules:
  - name: tenant-a-modules
    subjects: ["tenant-a/mod-*"]
    verbs: [read, refresh, list]
    sessions:
      - tenant: a
  - name: enrollers
    subjects: ["platform/login"]
    verbs: [enroll, revoke, list, read]
    sessions:
      - tenant: "*"
`;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'tb-auth-'));
  tlsDir = join(dir, 'tls');
  [redis, oidc, k8s, ca, otherCa] = await Promise.all([
    startRedisNodes(2),
    startOidcProvider({ accessTokenTtlSeconds: 30 }),
    K8sIssuer.start({ bearerToken: DISCOVERY_BEARER }),
    makeCa('broker-ca'),
    makeCa('someone-else'),
  ]);
  leaf = await makeLeaf(ca, { commonName: SERVER_NAME, dnsNames: [SERVER_NAME] });
  // The files as a Secret mount holds them; replaced in place later (cert-manager renewal).
  mkdirSync(tlsDir);
  copyFileSync(leaf.certFile, join(tlsDir, 'tls.crt'));
  copyFileSync(leaf.keyFile, join(tlsDir, 'tls.key'));
  const bearerFile = join(dir, 'broker-sa-token');
  writeFileSync(bearerFile, DISCOVERY_BEARER);
  policyFile = join(dir, 'policy.yaml');
  writeFileSync(policyFile, POLICY_A);
  const log = pino(
    { level: 'info' },
    new Writable({
      write(chunk: Buffer, _enc, done) {
        logLines.push(...chunk.toString().split('\n').filter(Boolean));
        done();
      },
    }),
  );
  broker = await startInProcessBroker(
    brokerEnv(oidc, redisTopology(redis.urls), {
      TB_TLS_CERT_FILE: join(tlsDir, 'tls.crt'),
      TB_TLS_KEY_FILE: join(tlsDir, 'tls.key'),
      TB_AUTH_ISSUER: k8s.issuer,
      TB_AUTH_ISSUER_CA_FILE: k8s.ca.certFile,
      TB_AUTH_ISSUER_TOKEN_FILE: bearerFile,
      TB_AUTH_JWKS_FILE: '',
      TB_POLICY_FILE: policyFile,
      TB_LOG_LEVEL: 'info',
    }),
    log,
  );
}, 60_000);

afterAll(async () => {
  await broker?.stop();
  await Promise.all([oidc?.close(), k8s?.close(), redis?.stopAll()]);
  rmSync(dir, { recursive: true, force: true });
  for (const line of logLines) for (const s of secrets) expect(line.includes(s)).toBe(false);
});

let tokenFiles = 0;
/** A client presenting `token` (none when undefined), over TLS trusting `trust`. */
function clientWith(token: string | undefined, trust: TestCa = ca): BrokerClient {
  let tokenFile: string | undefined;
  if (token !== undefined) {
    secrets.push(token);
    tokenFile = join(dir, `token-${tokenFiles++}`);
    writeFileSync(tokenFile, token);
  }
  const transport: ClientTransportSettings = {
    tls: { caFile: trust.certFile, serverName: SERVER_NAME },
    tokenFile,
  };
  return new BrokerClient(broker.address, transport);
}

async function workload(namespace: string, serviceAccount: string): Promise<BrokerClient> {
  return clientWith(await k8s.sign({ namespace, serviceAccount, podName: `${serviceAccount}-0` }));
}

const errorCode = (err: grpc.ServiceError) => err.metadata?.get('tb-error-code')[0];

/** Enrolls a fresh user of `tenant` through the enroller; returns its generation. */
async function enrolled(tenant: string, user: string): Promise<number> {
  const login = await workload('platform', 'login');
  const minted = await oidc.mintTokens(`${tenant}-${user}`);
  const session = (await login.enroll(tenant, user, minted.refresh_token)).session!;
  expect(session.enrolledBy).toBe('platform/login');
  login.close();
  return session.generation;
}

describe('without a valid caller token (promise 8)', () => {
  it('every RPC but health answers UNAUTHENTICATED, and the session is untouched', async () => {
    const generation = await enrolled('a', 'victim');
    const expired = await k8s.sign({
      namespace: 'platform',
      serviceAccount: 'login',
      expiresInS: -120,
    });
    const cases: [string, string | undefined, RegExp][] = [
      ['no token', undefined, /no authorization/i],
      ['expired', expired, /expired/],
      [
        'wrong audience',
        await k8s.sign({ namespace: 'platform', serviceAccount: 'login', audience: 'kubernetes' }),
        /audience/,
      ],
      [
        'wrong issuer',
        await k8s.sign({
          namespace: 'platform',
          serviceAccount: 'login',
          issuer: 'https://evil.example',
        }),
        /issuer/,
      ],
      [
        'unknown key',
        await k8s.forgeWithForeignKey({ namespace: 'platform', serviceAccount: 'login' }),
        /signature|key/,
      ],
      [
        'alg none',
        k8s.forgeAlgNone({ namespace: 'platform', serviceAccount: 'login' }),
        /algorithm/,
      ],
      [
        'HMAC with the public key',
        await k8s.forgeHs256WithPublicKey({ namespace: 'platform', serviceAccount: 'login' }),
        /algorithm/,
      ],
    ];
    const minted = await oidc.mintTokens('attacker');
    secrets.push(minted.refresh_token);
    for (const [what, token, message] of cases) {
      const client = clientWith(token);
      const calls: [string, () => Promise<unknown>][] = [
        ['Enroll', () => client.enroll('a', 'victim', minted.refresh_token)],
        ['GetToken', () => client.getToken('a', 'victim')],
        ['Refresh', () => client.refresh('a', 'victim', generation)],
        ['Revoke', () => client.revoke('a', 'victim')],
        ['ListSessions', () => client.list('a')],
      ];
      for (const [rpc, run] of calls) {
        const err = await rpcError(run());
        expect(err.code, `${what}: ${rpc}`).toBe(grpc.status.UNAUTHENTICATED);
        expect(errorCode(err), `${what}: ${rpc}`).toBe('UNAUTHENTICATED');
        expect(err.details, `${what}: ${rpc}`).toMatch(message);
        if (token) expect(err.details.includes(token)).toBe(false);
      }
      const watcher = client.watch();
      watcher.subscribe('a', 'victim');
      await watcher.until(() => watcher.ended, 5_000, `${what}: the Watch stream to end`);
      expect(watcher.of('a', 'victim'), `${what}: Watch`).toEqual([]);
      client.close();
    }
    // Untouched: same generation, still active, the enroller's family.
    const reader = await workload('tenant-a', 'mod-inventory');
    const token = (await reader.getToken('a', 'victim')).token!;
    expect(token.generation).toBe(generation);
    expect(token.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
    reader.close();
    // Health stays open to probes without a token.
    const health = clientWith(undefined);
    await expect(health.health()).resolves.toBe('SERVING');
    health.close();
    expect(
      logLines.some(
        (l) => l.includes('"logger":"audit"') && l.includes('"outcome":"unauthenticated"'),
      ),
    ).toBe(true);
  }, 60_000);
});

describe('the access policy (promise 8)', () => {
  it('confines a tenant-A reader to tenant A: GetToken, Refresh, Watch, Enroll, Revoke, ListSessions', async () => {
    const gA = await enrolled('a', 'alice');
    const gB = await enrolled('b', 'bob');
    const reader = await workload('tenant-a', 'mod-data-import');

    expect((await reader.getToken('a', 'alice')).token!.generation).toBe(gA);
    for (const promise of [reader.getToken('b', 'bob'), reader.refresh('b', 'bob', gB)]) {
      const err = await rpcError(promise);
      expect(err.code).toBe(grpc.status.PERMISSION_DENIED);
      expect(errorCode(err)).toBe('PERMISSION_DENIED');
      expect(err.details).toContain('tenant-a/mod-data-import may not');
    }

    // One stream: B is refused, A keeps being served on the same stream.
    const watcher = reader.watch();
    watcher.subscribe('b', 'bob');
    watcher.subscribe('a', 'alice');
    await watcher.until(() => watcher.errors.length > 0 && watcher.of('a', 'alice').length > 0);
    expect(watcher.errors[0]).toMatchObject({
      tenant: 'b',
      user: 'bob',
      code: 'PERMISSION_DENIED',
    });
    expect(watcher.of('b', 'bob')).toEqual([]);
    await reader.refresh('a', 'alice', gA);
    await watcher.until(() => (watcher.latest('a', 'alice')?.generation ?? 0) > gA);
    expect(watcher.ended).toBe(false);
    watcher.close();

    // The attack: enrolling one's own refresh token over another tenant's user.
    const mine = await oidc.mintTokens('mallory');
    secrets.push(mine.refresh_token);
    const hijack = await rpcError(reader.enroll('b', 'bob', mine.refresh_token));
    expect(hijack.code).toBe(grpc.status.PERMISSION_DENIED);
    expect((await rpcError(reader.revoke('b', 'bob'))).code).toBe(grpc.status.PERMISSION_DENIED);
    const login = await workload('platform', 'login');
    const bob = (await login.getToken('b', 'bob')).token!;
    expect(bob.generation).toBe(gB);
    expect(bob.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);

    // ListSessions shows only what the caller may list, with who enrolled each.
    const listed = (await reader.list('')).sessions;
    expect(listed.length).toBeGreaterThan(0);
    expect(listed.every((s) => s.tenant === 'a')).toBe(true);
    expect(listed.find((s) => s.user === 'alice')?.enrolledBy).toBe('platform/login');
    expect((await rpcError(reader.list('b'))).code).toBe(grpc.status.PERMISSION_DENIED);
    const all = (await login.list('')).sessions.map((s) => s.tenant);
    expect(all).toEqual(expect.arrayContaining(['a', 'b']));

    // A subject no rule names may do nothing.
    const stranger = await workload('default', 'default');
    expect((await rpcError(stranger.getToken('a', 'alice'))).code).toBe(
      grpc.status.PERMISSION_DENIED,
    );

    const audit = logLines
      .filter((l) => l.includes('"logger":"audit"'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(audit).toEqual(
      expect.arrayContaining([
        expect.objectContaining({
          verb: 'enroll',
          subject: 'platform/login',
          tenant: 'b',
          outcome: 'allowed',
        }),
        expect.objectContaining({
          verb: 'enroll',
          subject: 'tenant-a/mod-data-import',
          tenant: 'b',
          outcome: 'denied',
        }),
        expect.objectContaining({
          verb: 'read',
          subject: 'tenant-a/mod-data-import',
          tenant: 'a',
          outcome: 'allowed',
          pod: 'mod-data-import-0',
        }),
      ]),
    );
    expect(
      audit.every(
        (a) => !JSON.stringify(a).includes('"bob"') && !JSON.stringify(a).includes('"alice"'),
      ),
    ).toBe(true);
    for (const c of [reader, login, stranger]) c.close();
  }, 60_000);

  it('follows a key rotation and a policy change without a restart, and keeps the last good policy', async () => {
    await enrolled('b', 'carol');
    await k8s.rotateKey();
    const rotated = await workload('tenant-b', 'mod-inventory');
    // The new key is fetched at once; the policy does not let tenant-b read yet.
    expect((await rpcError(rotated.getToken('b', 'carol'))).code).toBe(
      grpc.status.PERMISSION_DENIED,
    );

    writeFileSync(
      policyFile,
      `${POLICY_A}  - name: tenant-b-modules\n    subjects: ["tenant-b/*"]\n    verbs: [read]\n    sessions:\n      - tenant: b\n`,
    );
    await eventually(
      async () =>
        await rotated.getToken('b', 'carol').then(
          () => true,
          () => false,
        ),
      10_000,
      'the new rule',
    );

    // A broken file is refused (logged with line and field); the last good policy stays.
    writeFileSync(
      policyFile,
      `${POLICY_A}  - subjects: ["tenant-b/*"]\n    verbs: [reed]\n    sessions:\n      - tenant: b\n`,
    );
    await eventually(
      () => logLines.some((l) => l.includes('rules[2].verbs[0]')),
      10_000,
      'the refusal',
    );
    expect((await rotated.getToken('b', 'carol')).token!.status).toBe(
      SessionStatus.SESSION_STATUS_ACTIVE,
    );
    writeFileSync(policyFile, POLICY_A);
    rotated.close();
  }, 60_000);
});

describe('TLS on the listener', () => {
  it('refuses plaintext and other CAs; a renewed certificate reaches new connections while an open Watch and a sidecar keep going', async () => {
    const generation = await enrolled('a', 'dora');
    const token = await k8s.sign({ namespace: 'tenant-a', serviceAccount: 'mod-sidecar' });
    const plaintext = new BrokerClient(broker.address, 'plaintext');
    expect((await rpcError(plaintext.getToken('a', 'dora'))).code).toBe(grpc.status.UNAVAILABLE);
    plaintext.close();
    const impostorTrust = clientWith(token, otherCa);
    expect((await rpcError(impostorTrust.getToken('a', 'dora'))).code).toBe(
      grpc.status.UNAVAILABLE,
    );
    impostorTrust.close();

    const reader = clientWith(token);
    const watcher = reader.watch();
    watcher.subscribe('a', 'dora');
    await watcher.until(() => watcher.latest('a', 'dora')?.generation === generation);
    const tokenFile = join(dir, 'sidecar-token');
    writeFileSync(tokenFile, token);
    const sidecar: RunningSidecar = await startSidecar(
      loadSidecarConfig({
        TB_SIDECAR_BROKER_ADDRESS: broker.address,
        TB_SIDECAR_BROKER_CA_FILE: ca.certFile,
        TB_SIDECAR_BROKER_SERVER_NAME: SERVER_NAME,
        TB_SIDECAR_TOKEN_FILE: tokenFile,
        TB_SIDECAR_PORT: '0',
        TB_SIDECAR_USERS: 'a/dora',
        TB_SIDECAR_ALLOWED_USERS: 'a/d*',
        TB_SIDECAR_MAX_USERS: '1',
        TB_SIDECAR_SAFETY_SKEW_MS: '1000',
      }),
      pino({ level: 'silent' }),
    );
    const read = async (user = 'dora') =>
      fetch(`http://127.0.0.1:${sidecar.port}/v1/tokens/a/${user}?wait=3000`, {
        headers: { 'X-Token-Broker': 'true' },
      });
    try {
      expect((await read()).status).toBe(200);
      const before = await peerCertificate();
      const renewed = await makeLeaf(ca, { commonName: SERVER_NAME, dnsNames: [SERVER_NAME] });
      copyFileSync(renewed.certFile, join(tlsDir, 'tls.crt'));
      copyFileSync(renewed.keyFile, join(tlsDir, 'tls.key'));
      await eventually(
        async () => (await peerCertificate()).serialNumber === renewed.serialNumber,
        15_000,
        'the renewed certificate',
      );
      expect(before.serialNumber).toBe(leaf.serialNumber);

      // The stream opened before the renewal still delivers; the sidecar kept serving.
      await reader.refresh('a', 'dora', generation);
      await watcher.until(() => (watcher.latest('a', 'dora')?.generation ?? 0) > generation);
      expect(watcher.ended).toBe(false);
      const served = await read();
      expect(served.status).toBe(200);
      expect(((await served.json()) as { generation: number }).generation).toBeGreaterThan(
        generation,
      );
      const fresh = clientWith(token);
      expect((await fresh.getToken('a', 'dora')).token!.generation).toBeGreaterThan(generation);
      fresh.close();

      // Promise 8, sidecar side: a user outside its allowed list is refused without a subscription.
      const watchers = await broker.metrics.value('tb_broker_watchers');
      expect(watchers).toBeGreaterThanOrEqual(2); // this test's stream and the sidecar's
      const outside = await read('eve');
      expect(outside.status).toBe(403);
      expect(((await outside.json()) as { error: { code: string } }).error.code).toBe(
        'USER_NOT_ALLOWED',
      );
      await new Promise((r) => setTimeout(r, 200));
      expect(await broker.metrics.value('tb_broker_watchers')).toBe(watchers);
    } finally {
      watcher.close();
      reader.close();
      await sidecar.stop();
    }
  }, 60_000);
});

/** The certificate a new TLS connection to the broker is shown. */
function peerCertificate(): Promise<PeerCertificate> {
  const port = Number(broker.address.split(':').at(-1));
  return new Promise((resolve, reject) => {
    const socket = connect(
      { host: '127.0.0.1', port, servername: SERVER_NAME, ca: ca.certPem, ALPNProtocols: ['h2'] },
      () => {
        const cert = socket.getPeerCertificate();
        socket.destroy();
        resolve(cert);
      },
    );
    socket.once('error', reject);
  });
}
