/**
 * The admission webhook as it runs: a real process serving HTTPS, fed AdmissionReview v1 requests
 * as the API server sends them. Each JSONPatch is applied as the API server applies it, and the
 * result is checked against the Kubernetes schemas (kubernetes-models, unknown fields refused),
 * against the sidecar's own configuration check, and against what the library chart renders for
 * the same settings.
 */
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { loadSidecarConfig } from '../../sidecar/config.js';
import {
  postReview,
  startWebhookProcess,
  type WebhookProcess,
} from '../../scripts/dev/webhook-process.js';
import { applyPatch, type AddOperation } from '../harness/json-patch.js';
import { makeCa, makeLeaf, type TestCa } from '../harness/test-certs.js';
import { find, HelmCharts, REPO, type K8sObject } from '../helm/helm-harness.js';
import { K8sValidator } from '../helm/k8s-schema.js';

const SERVICE = 'token-broker-webhook.token-broker.svc';

interface Container {
  name: string;
  restartPolicy?: string;
  env?: Array<{ name: string; value: string }>;
  volumeMounts?: Array<{ name: string; mountPath: string; readOnly?: boolean }>;
  [field: string]: unknown;
}
interface Pod extends K8sObject {
  metadata: K8sObject['metadata'] & { annotations?: Record<string, string> };
  spec: {
    containers: Container[];
    initContainers?: Container[];
    volumes?: Array<{ name: string; [field: string]: unknown }>;
    restartPolicy?: string;
    [field: string]: unknown;
  };
}
interface ReviewResponse {
  apiVersion: string;
  kind: string;
  response: {
    uid: string;
    allowed: boolean;
    patchType?: string;
    patch?: string;
    status?: { code: number; message: string };
  };
}

// The example module chart's tokenBroker values: the webhook gets the same settings, so the two
// must produce the same sidecar.
const exampleValues = parse(
  readFileSync(join(REPO, 'deploy', 'helm', 'examples', 'module-app', 'values.yaml'), 'utf8'),
) as { tokenBroker: Record<string, unknown> };

let ca: TestCa;
let webhook: WebhookProcess;
let charts: HelmCharts;
const validator = new K8sValidator([
  { apiVersion: 'v1', kind: 'Pod' },
  { apiVersion: 'batch/v1', kind: 'Job' },
]);

beforeAll(async () => {
  ca = await makeCa('webhook-ca');
  const leaf = await makeLeaf(ca, { commonName: SERVICE, dnsNames: [SERVICE] });
  const dir = mkdtempSync(join(tmpdir(), 'tb-webhook-'));
  const settingsFile = join(dir, 'sidecar.json');
  writeFileSync(settingsFile, JSON.stringify(exampleValues.tokenBroker));
  [webhook, charts] = await Promise.all([
    startWebhookProcess({
      TB_WEBHOOK_TLS_CERT_FILE: leaf.certFile,
      TB_WEBHOOK_TLS_KEY_FILE: leaf.keyFile,
      TB_WEBHOOK_NAMESPACE: 'token-broker',
      TB_WEBHOOK_SIDECAR_FILE: settingsFile,
    }),
    Promise.resolve(HelmCharts.setUp()),
  ]);
}, 120_000);
afterAll(async () => {
  await webhook?.stop();
  charts?.tearDown();
});

let uid = 0;
async function admit(pod: Pod, namespace = 'folio'): Promise<ReviewResponse['response']> {
  const id = `uid-${++uid}`;
  const reply = await postReview(
    webhook.port,
    {
      apiVersion: 'admission.k8s.io/v1',
      kind: 'AdmissionReview',
      request: {
        uid: id,
        kind: { group: '', version: 'v1', kind: 'Pod' },
        resource: { group: '', version: 'v1', resource: 'pods' },
        namespace,
        operation: 'CREATE',
        object: pod,
      },
    },
    { ca: ca.certPem, serverName: SERVICE },
  );
  expect(reply.status).toBe(200);
  const body = reply.body as ReviewResponse;
  expect(body.apiVersion).toBe('admission.k8s.io/v1');
  expect(body.kind).toBe('AdmissionReview');
  expect(body.response.uid).toBe(id);
  return body.response;
}

async function injected(pod: Pod): Promise<Pod> {
  const response = await admit(pod);
  expect(response.allowed).toBe(true);
  expect(response.patchType).toBe('JSONPatch');
  const patch = JSON.parse(
    Buffer.from(response.patch!, 'base64').toString('utf8'),
  ) as AddOperation[];
  const patched = applyPatch(pod, patch);
  expect(await validator.problems(patched)).toEqual([]);
  return patched;
}

function pod(annotations: Record<string, string> = {}, spec: Partial<Pod['spec']> = {}): Pod {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: {
      name: 'mod-data-import-7d9f-abcde',
      namespace: 'folio',
      labels: { app: 'mod-data-import' },
      annotations: { 'token-broker.io/inject': 'true', ...annotations },
    },
    spec: {
      containers: [{ name: 'module', image: 'folio/mod-data-import:3.1.0' }],
      ...spec,
    },
  };
}

function sidecarOf(p: Pod): Container {
  const found = (p.spec.initContainers ?? []).filter((c) => c.name === 'token-broker-sidecar');
  expect(found).toHaveLength(1);
  return found[0]!;
}

function envOf(c: Container): Record<string, string> {
  return Object.fromEntries((c.env ?? []).map((e) => [e.name, e.value]));
}

/** The example chart's pod, as the library renders it (extra: helm --set flags). */
function libraryPod(extra: string[] = []): Pod['spec'] {
  const deployment = find(charts.render(charts.example, [], extra), 'Deployment') as unknown as {
    spec: { template: { spec: Pod['spec'] } };
  };
  return deployment.spec.template.spec;
}

describe('the admission webhook over HTTPS', () => {
  it('injects a plain pod: a native sidecar, its volumes, the module env, the same sidecar as the library chart', async () => {
    const patched = await injected(pod());
    const sidecar = sidecarOf(patched);
    expect(sidecar.restartPolicy).toBe('Always');
    expect(patched.spec.containers).toHaveLength(1);
    expect(envOf(patched.spec.containers[0]!)).toEqual({
      TOKEN_BROKER_URL: 'http://127.0.0.1:8181',
    });
    expect(patched.metadata.labels).toEqual({
      app: 'mod-data-import',
      'token-broker.io/sidecar': 'true',
    });
    expect(patched.metadata.annotations!['token-broker.io/status']).toBe('injected');
    const config = loadSidecarConfig(envOf(sidecar));
    expect(config.users).toEqual([{ tenant: 'diku', user: 'data-import-system-user' }]);
    expect(config.brokerTls).toEqual({
      caFile: '/var/run/token-broker/ca/ca.crt',
      serverName: undefined,
    });

    const library = libraryPod();
    expect(sidecar).toEqual(library.initContainers![0]);
    const libraryVolumes = library.volumes!.filter((v) => v.name.startsWith('token-broker-'));
    expect(patched.spec.volumes).toEqual(libraryVolumes);
    expect(patched.spec.volumes!.map((v) => v.name)).toEqual([
      'token-broker-sa-token',
      'token-broker-ca',
    ]);
  });

  it('applies the annotations: the same sidecar as the library with the same settings', async () => {
    const patched = await injected(
      pod(
        {
          'token-broker.io/users': 'diku/data-import-system-user,diku/other',
          'token-broker.io/allowed-users': 'diku/*',
          'token-broker.io/token-dir': '/var/run/token-broker/tokens',
          'token-broker.io/token-dir-containers': 'module',
          'token-broker.io/port': '9191',
          'token-broker.io/safety-skew-ms': '20000',
          'token-broker.io/log-level': 'debug',
          'token-broker.io/cpu-request': '5m',
          'token-broker.io/memory-limit': '96Mi',
          'token-broker.io/image': 'registry.example:5000/tb/sidecar:0.2.0',
        },
        {
          containers: [
            {
              name: 'module',
              image: 'folio/mod-data-import:3.1.0',
              env: [{ name: 'JAVA_OPTS', value: '-Xmx1g' }],
            },
            { name: 'log-shipper', image: 'fluent/fluent-bit:3' },
          ],
          volumes: [{ name: 'tmp', emptyDir: {} }],
        },
      ),
    );
    const sidecar = sidecarOf(patched);
    const library = libraryPod([
      '--set-json',
      'tokenBroker.users=["diku/data-import-system-user","diku/other"]',
      '--set-json',
      'tokenBroker.allowedUsers=["diku/*"]',
      '--set',
      'tokenBroker.tokenDir=/var/run/token-broker/tokens,tokenBroker.port=9191,tokenBroker.safetySkewMs=20000,tokenBroker.logLevel=debug',
      '--set',
      'tokenBroker.resources.requests.cpu=5m,tokenBroker.resources.limits.memory=96Mi',
      '--set',
      'tokenBroker.image.repository=registry.example:5000/tb/sidecar,tokenBroker.image.tag=0.2.0',
    ]);
    expect(sidecar).toEqual(library.initContainers![0]);
    expect(patched.spec.volumes).toEqual([
      { name: 'tmp', emptyDir: {} },
      ...library.volumes!.filter((v) => v.name.startsWith('token-broker-')),
    ]);
    const [module, shipper] = patched.spec.containers;
    // Env added after the module's own; the token directory only where the annotation says.
    expect(module!.env).toEqual([
      { name: 'JAVA_OPTS', value: '-Xmx1g' },
      { name: 'TOKEN_BROKER_URL', value: 'http://127.0.0.1:9191' },
      { name: 'TOKEN_BROKER_TOKEN_DIR', value: '/var/run/token-broker/tokens' },
    ]);
    expect(module!.volumeMounts).toEqual([
      { name: 'token-broker-tokens', mountPath: '/var/run/token-broker/tokens', readOnly: true },
    ]);
    expect(shipper!.volumeMounts).toBeUndefined();
    const config = loadSidecarConfig(envOf(sidecar));
    expect(config.port).toBe(9191);
    expect(config.safetySkewMs).toBe(20_000);
    expect(config.tokenDir).toBe('/var/run/token-broker/tokens');
    expect(sidecar.resources).toEqual({
      requests: { cpu: '5m', memory: '64Mi' },
      limits: { cpu: '500m', memory: '96Mi' },
    });
  });

  it('serves on a Unix socket when asked: the same sidecar as the library in socket mode', async () => {
    const socket = '/var/run/token-broker/socket/sidecar.sock';
    const patched = await injected(pod({ 'token-broker.io/socket': socket }));
    const sidecar = sidecarOf(patched);
    expect(sidecar).toEqual(
      libraryPod(['--set', `tokenBroker.socket=${socket}`]).initContainers![0],
    );
    expect(loadSidecarConfig(envOf(sidecar)).socketPath).toBe(socket);
    const module = patched.spec.containers[0]!;
    expect(module.env).toEqual([{ name: 'TOKEN_BROKER_SOCKET', value: socket }]);
    expect(module.volumeMounts).toEqual([
      { name: 'token-broker-socket', mountPath: '/var/run/token-broker/socket' },
    ]);
  });

  it("gives a Job's pod a native sidecar, so the Job can complete", async () => {
    const jobPod = pod(
      {},
      {
        restartPolicy: 'Never',
        containers: [{ name: 'import', image: 'folio/mod-data-import:3.1.0', args: ['--once'] }],
      },
    );
    jobPod.metadata.labels = { 'batch.kubernetes.io/job-name': 'nightly-import' };
    const patched = await injected(jobPod);
    const job: K8sObject = {
      apiVersion: 'batch/v1',
      kind: 'Job',
      metadata: { name: 'nightly-import', namespace: 'folio' },
      spec: {
        backoffLimit: 2,
        template: { metadata: patched.metadata, spec: patched.spec },
      },
    };
    expect(await validator.problems(job)).toEqual([]);
    // The Job completes when its regular containers have ended: the sidecar is none of them.
    expect(patched.spec.containers.map((c) => c.name)).toEqual(['import']);
    expect(sidecarOf(patched).restartPolicy).toBe('Always');
    expect(patched.spec.restartPolicy).toBe('Never');
  });

  it('places the sidecar after the other init containers, or first with inject-first', async () => {
    const spec = {
      initContainers: [
        { name: 'migrate', image: 'folio/migrate:1' },
        { name: 'wait-db', image: 'busybox:1' },
      ],
    };
    const last = await injected(pod({}, spec));
    expect(last.spec.initContainers!.map((c) => c.name)).toEqual([
      'migrate',
      'wait-db',
      'token-broker-sidecar',
    ]);
    const first = await injected(pod({ 'token-broker.io/inject-first': 'true' }, spec));
    expect(first.spec.initContainers!.map((c) => c.name)).toEqual([
      'token-broker-sidecar',
      'migrate',
      'wait-db',
    ]);
    expect(sidecarOf(first)).toEqual(sidecarOf(last));
  });

  it('leaves a pod already injected alone', async () => {
    const once = await injected(pod());
    const again = await admit(once);
    expect(again).toEqual({ uid: expect.any(String) as string, allowed: true });
    // Also when only the container is there (a pod injected by the library chart).
    const spec = libraryPod();
    const byLibrary = await admit(pod({}, spec));
    expect(byLibrary.patch).toBeUndefined();
    expect(byLibrary.allowed).toBe(true);
  });

  it('never injects the broker namespace, token-broker pods, or pods not asking', async () => {
    expect((await admit(pod(), 'token-broker')).patch).toBeUndefined();
    const own = pod();
    own.metadata.labels = { 'app.kubernetes.io/part-of': 'token-broker' };
    expect((await admit(own)).patch).toBeUndefined();
    const plain = pod();
    plain.metadata.annotations = {};
    const response = await admit(plain);
    expect(response.allowed).toBe(true);
    expect(response.patch).toBeUndefined();
  });

  it('refuses a pod with a bad annotation, naming it', async () => {
    const cases: Array<[Record<string, string>, RegExp]> = [
      [
        { 'token-broker.io/port': '99999' },
        /token-broker\.io\/port must be a whole number from 1 to 65535, got "99999"/,
      ],
      [
        { 'token-broker.io/userz': 'diku/a' },
        /token-broker\.io\/userz is not a token-broker annotation/,
      ],
      [
        { 'token-broker.io/inject-first': 'yes' },
        /token-broker\.io\/inject-first must be "true" or "false"/,
      ],
      [
        { 'token-broker.io/users': 'diku' },
        /token-broker\.io\/users entry 1 \("diku"\) must be tenant\/user/,
      ],
      [
        { 'token-broker.io/allowed-users': 'college/*', 'token-broker.io/users': 'diku/a' },
        /token-broker\.io\/users gives a sidecar setting it refuses: TB_SIDECAR_USERS\[0\] is not matched/,
      ],
      [
        { 'token-broker.io/memory-limit': 'lots' },
        /token-broker\.io\/memory-limit must be a Kubernetes quantity/,
      ],
      [
        { 'token-broker.io/token-dir': 'relative/dir' },
        /token-broker\.io\/token-dir must be an absolute directory path/,
      ],
      [
        { 'token-broker.io/token-dir': '/tokens', 'token-broker.io/token-dir-containers': 'nope' },
        /token-broker\.io\/token-dir-containers names "nope", which is no container of this pod \(containers: module\)/,
      ],
      [
        { 'token-broker.io/image': 'Sidecar Image' },
        /token-broker\.io\/image must be repository:tag/,
      ],
      [{ 'token-broker.io/log-level': 'loud' }, /token-broker\.io\/log-level must be one of/],
      [
        { 'token-broker.io/socket': 'sidecar.sock' },
        /token-broker\.io\/socket must be an absolute file path/,
      ],
      [{ 'token-broker.io/inject': 'yes' }, /token-broker\.io\/inject must be "true" or "false"/],
    ];
    for (const [annotations, message] of cases) {
      const response = await admit(pod(annotations));
      expect(response.allowed, JSON.stringify(annotations)).toBe(false);
      expect(response.patch).toBeUndefined();
      expect(response.status!.code).toBe(400);
      expect(response.status!.message).toMatch(message);
    }
  });

  it('answers 400 to a body that is no AdmissionReview, and keeps serving', async () => {
    const tls = { ca: ca.certPem, serverName: SERVICE };
    expect((await postReview(webhook.port, { hello: 'world' }, tls)).status).toBe(400);
    expect(
      (
        await postReview(
          webhook.port,
          { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview' },
          tls,
        )
      ).status,
    ).toBe(400);
    expect((await admit(pod())).allowed).toBe(true);
  });
});

describe('the webhook certificate', () => {
  it('is re-read when cert-manager renews it; a broken pair keeps the last good one', async () => {
    const { startWebhook } = await import('../../webhook/webhook-server.js');
    const { mergeSettings } = await import('../../webhook/sidecar-settings.js');
    const { pino } = await import('pino');
    const first = await makeCa('webhook-renew-1');
    const second = await makeCa('webhook-renew-2');
    const dir = mkdtempSync(join(tmpdir(), 'tb-webhook-renew-'));
    const certFile = join(dir, 'tls.crt');
    const keyFile = join(dir, 'tls.key');
    const install = async (ca: TestCa) => {
      const leaf = await makeLeaf(ca, { commonName: SERVICE, dnsNames: [SERVICE] });
      writeFileSync(certFile, leaf.certPem);
      writeFileSync(keyFile, leaf.keyPem);
    };
    await install(first);
    const lines: string[] = [];
    const log = pino({ level: 'info' }, { write: (line: string) => lines.push(line) });
    const running = await startWebhook(
      {
        host: '127.0.0.1',
        port: 0,
        certFile,
        keyFile,
        namespace: 'token-broker',
        sidecar: mergeSettings(exampleValues.tokenBroker, 'test'),
        logLevel: 'info',
      },
      log,
      { reloadCheckMs: 50 },
    );
    const healthy = (ca: TestCa) =>
      postReview(running.port, {}, { ca: ca.certPem, serverName: SERVICE }, '/healthz').then(
        () => true,
        () => false,
      );
    const until = async (what: () => Promise<boolean>) => {
      for (let i = 0; i < 200 && !(await what()); i++) await new Promise((r) => setTimeout(r, 50));
      return what();
    };
    try {
      expect(await healthy(first)).toBe(true);
      await install(second);
      expect(await until(() => healthy(second))).toBe(true);
      expect(await healthy(first)).toBe(false);
      // Half-written: a certificate without its key. The last good pair stays in force.
      writeFileSync(certFile, 'not a certificate');
      expect(
        await until(() =>
          Promise.resolve(lines.some((l) => l.includes('keeping the last good pair'))),
        ),
      ).toBe(true);
      expect(await healthy(second)).toBe(true);
    } finally {
      await running.stop();
    }
  });
});
