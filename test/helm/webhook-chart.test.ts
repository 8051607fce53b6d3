/**
 * The chart's sidecar injection webhook, rendered by the real helm: every object valid, the
 * webhook's Deployment (2 replicas, PDB, the broker image's second entry point), selectors that
 * never reach token-broker's own pods, and a MutatingWebhookConfiguration whose caBundle is the CA
 * of the certificate the webhook really serves: the rendered Secret and settings are handed to the
 * running webhook, and an AdmissionReview is posted to it verifying against that caBundle, by the
 * Service name the API server dials.
 */
import { X509Certificate } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSidecarConfig } from '../../sidecar/config.js';
import { postReview, startWebhookProcess } from '../../scripts/dev/webhook-process.js';
import { applyPatch, type AddOperation } from '../harness/json-patch.js';
import {
  configMaps,
  expectConsistent,
  expectValid,
  prepareValidator,
  type ConfigMap,
  type Workload,
} from './chart-checks.js';
import { find, findAll, HelmCharts, type K8sObject } from './helm-harness.js';

type Webhooks = K8sObject & {
  metadata: { annotations?: Record<string, string> };
  webhooks: Array<{
    name: string;
    failurePolicy: string;
    clientConfig: {
      caBundle?: string;
      service: { name: string; namespace: string; path: string; port: number };
    };
    namespaceSelector: { matchLabels?: Record<string, string>; matchExpressions: unknown[] };
    objectSelector: { matchExpressions: unknown[] };
    rules: Array<{ operations: string[]; resources: string[] }>;
  }>;
};
type Secret = K8sObject & { data: Record<string, string> };

let charts: HelmCharts;
beforeAll(() => {
  charts = HelmCharts.setUp();
  prepareValidator();
}, 120_000);
afterAll(() => charts?.tearDown());

describe('the webhook in the token-broker chart', () => {
  it('is off by default: no webhook object is rendered', () => {
    const objects = charts.render(charts.broker, ['minimal.yaml']);
    expect(findAll(objects, 'MutatingWebhookConfiguration')).toEqual([]);
    expect(objects.filter((o) => o.metadata.name.includes('webhook'))).toEqual([]);
  });

  it('renders a valid Deployment of 2 with a PDB, run from the broker image', async () => {
    const objects = charts.render(charts.broker, ['minimal.yaml', 'webhook.yaml']);
    await expectValid(objects);
    expectConsistent(objects);
    const deployments = findAll(objects, 'Deployment') as Workload[];
    const broker = deployments.find((d) => d.metadata.name === 'token-broker')!;
    const webhook = find(objects, 'Deployment', 'token-broker-webhook') as Workload;
    expect(webhook.spec.replicas).toBe(2);
    const container = webhook.spec.template.spec.containers[0]!;
    expect(container.image).toBe(broker.spec.template.spec.containers[0]!.image);
    expect(container.command).toEqual(['node', 'dist/bin/webhook.js']);
    const pdb = find(objects, 'PodDisruptionBudget', 'token-broker-webhook') as K8sObject & {
      spec: { minAvailable: number; selector: { matchLabels: Record<string, string> } };
    };
    expect(pdb.spec.minAvailable).toBe(1);
    expect(pdb.spec.selector.matchLabels).toEqual(webhook.spec.selector.matchLabels);
    // The webhook's own pods carry the label its objectSelector leaves out.
    expect(webhook.spec.template.metadata.labels['app.kubernetes.io/part-of']).toBe('token-broker');
    expect(broker.spec.template.metadata.labels['app.kubernetes.io/part-of']).toBe('token-broker');
  });

  it('selects pods on CREATE in labelled namespaces, never the release namespace or its own pods', () => {
    const objects = charts.render(charts.broker, ['minimal.yaml', 'webhook.yaml']);
    const [hook] = (find(objects, 'MutatingWebhookConfiguration') as Webhooks).webhooks;
    expect(hook!.failurePolicy).toBe('Fail');
    expect(hook!.rules).toEqual([
      expect.objectContaining({ operations: ['CREATE'], resources: ['pods'] }),
    ]);
    expect(hook!.namespaceSelector).toEqual({
      matchLabels: { 'token-broker.io/injection': 'enabled' },
      matchExpressions: [
        { key: 'kubernetes.io/metadata.name', operator: 'NotIn', values: ['token-broker'] },
      ],
    });
    expect(hook!.objectSelector).toEqual({
      matchExpressions: [
        { key: 'app.kubernetes.io/part-of', operator: 'NotIn', values: ['token-broker'] },
      ],
    });
    expect(hook!.clientConfig.service).toEqual({
      name: 'token-broker-webhook',
      namespace: 'token-broker',
      path: '/mutate',
      port: 443,
    });
    const service = find(objects, 'Service', 'token-broker-webhook') as K8sObject & {
      spec: { ports: Array<{ port: number; targetPort: string }> };
    };
    expect(service.spec.ports).toEqual([
      expect.objectContaining({ port: 443, targetPort: 'https' }),
    ]);
  });

  it("has a caBundle that verifies the certificate the running webhook serves, and injects this release's sidecar", async () => {
    const objects = charts.render(charts.broker, ['minimal.yaml', 'webhook.yaml']);
    const [hook] = (find(objects, 'MutatingWebhookConfiguration') as Webhooks).webhooks;
    const caBundle = Buffer.from(hook!.clientConfig.caBundle!, 'base64').toString('utf8');
    const secret = find(objects, 'Secret', 'token-broker-webhook-tls') as Secret;
    const pem = (key: string) => Buffer.from(secret.data[key]!, 'base64').toString('utf8');
    const leaf = new X509Certificate(pem('tls.crt'));
    expect(leaf.verify(new X509Certificate(caBundle).publicKey)).toBe(true);

    const settings = (find(objects, 'ConfigMap', 'token-broker-webhook') as ConfigMap).data[
      'sidecar.json'
    ]!;
    const dir = mkdtempSync(join(tmpdir(), 'tb-webhook-chart-'));
    for (const [file, text] of [
      ['tls.crt', pem('tls.crt')],
      ['tls.key', pem('tls.key')],
      ['sidecar.json', settings],
    ] as const)
      writeFileSync(join(dir, file), text);
    const deployment = find(objects, 'Deployment', 'token-broker-webhook') as Workload;
    const env = Object.fromEntries(
      deployment.spec.template.spec.containers[0]!.env!.map((e) => [e.name, e.value!]),
    );
    const webhook = await startWebhookProcess({
      TB_WEBHOOK_TLS_CERT_FILE: join(dir, 'tls.crt'),
      TB_WEBHOOK_TLS_KEY_FILE: join(dir, 'tls.key'),
      TB_WEBHOOK_SIDECAR_FILE: join(dir, 'sidecar.json'),
      TB_WEBHOOK_NAMESPACE: env.TB_WEBHOOK_NAMESPACE!,
      TB_WEBHOOK_LOG_LEVEL: env.TB_WEBHOOK_LOG_LEVEL!,
    });
    try {
      const pod = {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: {
          name: 'm',
          namespace: 'folio',
          annotations: { 'token-broker.io/inject': 'true' },
        },
        spec: { containers: [{ name: 'module', image: 'm:1' }] },
      };
      const review = {
        apiVersion: 'admission.k8s.io/v1',
        kind: 'AdmissionReview',
        request: {
          uid: 'u1',
          kind: { group: '', version: 'v1', kind: 'Pod' },
          namespace: 'folio',
          object: pod,
        },
      };
      // The API server dials <service>.<namespace>.svc and trusts only the caBundle.
      const serverName = `${hook!.clientConfig.service.name}.${hook!.clientConfig.service.namespace}.svc`;
      const reply = await postReview(webhook.port, review, { ca: caBundle, serverName });
      expect(reply.status).toBe(200);
      const response = (reply.body as { response: { allowed: boolean; patch: string } }).response;
      expect(response.allowed).toBe(true);
      const patched = applyPatch(
        pod,
        JSON.parse(Buffer.from(response.patch, 'base64').toString()) as AddOperation[],
      ) as unknown as {
        spec: {
          initContainers: Array<{
            env: Array<{ name: string; value: string }>;
            resources: unknown;
          }>;
          volumes: Array<{
            name: string;
            configMap?: { name: string };
            projected?: { sources: Array<{ serviceAccountToken: { audience: string } }> };
          }>;
        };
      };
      const sidecar = patched.spec.initContainers[0]!;
      const config = loadSidecarConfig(
        Object.fromEntries(sidecar.env.map((e) => [e.name, e.value])),
      );
      const broker = find(objects, 'Service', 'token-broker-headless');
      expect(config.brokerAddress).toBe(
        `dns:///${broker.metadata.name}.token-broker.svc.cluster.local:50051`,
      );
      expect(config.allowedUsers!.map((a) => a.pattern)).toEqual(['diku/*']);
      expect(sidecar.resources).toEqual({
        requests: { cpu: '10m', memory: '32Mi' },
        limits: { cpu: '200m', memory: '64Mi' },
      });
      // The CA ConfigMap it mounts is the one this release writes into the module namespace.
      const caVolume = patched.spec.volumes.find((v) => v.configMap)!;
      expect(configMaps(objects, caVolume.configMap!.name).has('folio')).toBe(true);
      const audience = patched.spec.volumes.find((v) => v.projected)!.projected!.sources[0]!
        .serviceAccountToken.audience;
      expect(audience).toBe('token-broker');
      // A wrong CA is refused by the TLS handshake: the caBundle is what made the call work.
      const other = find(
        charts.render(charts.broker, ['minimal.yaml', 'webhook.yaml']),
        'MutatingWebhookConfiguration',
      ) as Webhooks;
      const otherCa = Buffer.from(other.webhooks[0]!.clientConfig.caBundle!, 'base64').toString(
        'utf8',
      );
      await expect(postReview(webhook.port, review, { ca: otherCa, serverName })).rejects.toThrow();
    } finally {
      await webhook.stop();
    }
  });

  it('takes its certificate from cert-manager, whose CA injector fills the caBundle', async () => {
    const objects = charts.render(charts.broker, ['minimal.yaml', 'webhook-cert-manager.yaml']);
    await expectValid(objects);
    const certificate = find(objects, 'Certificate', 'token-broker-webhook') as K8sObject & {
      spec: { secretName: string; dnsNames: string[]; issuerRef: { name: string; kind: string } };
    };
    expect(certificate.spec.dnsNames).toContain('token-broker-webhook.token-broker.svc');
    expect(certificate.spec.issuerRef).toMatchObject({ name: 'webhook-ca', kind: 'ClusterIssuer' });
    const deployment = find(objects, 'Deployment', 'token-broker-webhook') as Workload;
    const tls = deployment.spec.template.spec.volumes!.find((v) => v.name === 'tls')!;
    expect(tls.secret!.secretName).toBe(certificate.spec.secretName);
    const config = find(objects, 'MutatingWebhookConfiguration') as Webhooks;
    expect(config.metadata.annotations).toEqual({
      'cert-manager.io/inject-ca-from': 'token-broker/token-broker-webhook',
    });
    expect(config.webhooks[0]!.clientConfig.caBundle).toBeUndefined();
    expect(config.webhooks[0]!.failurePolicy).toBe('Ignore');
    expect(findAll(objects, 'Secret').map((s) => s.metadata.name)).not.toContain(
      'token-broker-webhook-tls',
    );
  });

  it('prints NOTES that show the annotation path first', () => {
    const on = charts.notes(charts.broker, ['minimal.yaml', 'webhook.yaml']);
    expect(on).toContain(
      'kubectl label namespace <module-namespace> token-broker.io/injection=enabled',
    );
    expect(on).toContain('token-broker-webhook, failurePolicy Fail');
    expect(on.indexOf('token-broker.io/inject: "true"')).toBeLessThan(on.indexOf('library chart'));
    const off = charts.notes(charts.broker, ['minimal.yaml']);
    expect(off).toContain('webhook.enabled=true');
  });

  it('refuses a sidecar brokerAddress, a misspelt sidecar key and an unknown failurePolicy', () => {
    const address = charts.template(
      charts.broker,
      ['minimal.yaml', 'webhook.yaml'],
      ['--set', 'webhook.sidecar.brokerAddress=x:1'],
    );
    expect(address.ok).toBe(false);
    expect(address.stderr).toMatch(/webhook\/sidecar': additional properties 'brokerAddress'/);
    const typo = charts.template(
      charts.broker,
      ['minimal.yaml', 'webhook.yaml'],
      ['--set', 'webhook.sidecar.tls.caConfigMapp=x'],
    );
    expect(typo.stderr).toMatch(/webhook\/sidecar\/tls': additional properties 'caConfigMapp'/);
    const policy = charts.template(
      charts.broker,
      ['minimal.yaml', 'webhook.yaml'],
      ['--set', 'webhook.failurePolicy=Sometimes'],
    );
    expect(policy.ok).toBe(false);
    expect(policy.stderr).toMatch(/failurePolicy/);
  });
});
