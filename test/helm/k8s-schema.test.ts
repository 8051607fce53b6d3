import { describe, expect, it } from 'vitest';
import { K8sValidator } from './k8s-schema.js';
import type { K8sObject } from './helm-harness.js';

// The validator is what makes the chart tests able to fail: prove it catches each kind of error.
const deployment = (): K8sObject => ({
  apiVersion: 'apps/v1',
  kind: 'Deployment',
  metadata: { name: 'demo', labels: { 'app.kubernetes.io/name': 'demo' } },
  spec: {
    selector: { matchLabels: { app: 'demo' } },
    template: {
      metadata: { labels: { app: 'demo' } },
      spec: {
        containers: [
          {
            name: 'demo',
            image: 'demo:1',
            ports: [{ name: 'grpc', containerPort: 50051 }],
            readinessProbe: { grpc: { port: 50051 } },
            resources: { requests: { cpu: '100m' } },
          },
        ],
      },
    },
  },
});

const validator = new K8sValidator([
  { apiVersion: 'apps/v1', kind: 'Deployment' },
  { apiVersion: 'monitoring.coreos.com/v1', kind: 'ServiceMonitor' },
  { apiVersion: 'cert-manager.io/v1', kind: 'Certificate' },
]);

describe('K8sValidator', () => {
  it('passes a valid Deployment', async () => {
    expect(await validator.problems(deployment())).toEqual([]);
  });

  it('reports an unknown field with its path', async () => {
    const object = deployment() as unknown as {
      spec: { template: { spec: { containers: Array<Record<string, unknown>> } } };
    };
    object.spec.template.spec.containers[0]!.readinessProbe = { grpcc: { port: 50051 } };
    object.spec.template.spec.containers[0]!.restartPolicyy = 'Always';
    const problems = await validator.problems(object as unknown as K8sObject);
    expect(problems).toContain(
      'Deployment/demo: unknown field spec.template.spec.containers[0].readinessProbe.grpcc',
    );
    expect(problems).toContain(
      'Deployment/demo: unknown field spec.template.spec.containers[0].restartPolicyy',
    );
  });

  it('reports a wrong type and a missing required field', async () => {
    const object = deployment() as unknown as {
      spec: {
        replicas: unknown;
        template: { spec: { containers: Array<Record<string, unknown>> } };
      };
    };
    object.spec.replicas = 'three';
    delete object.spec.template.spec.containers[0]!.name;
    const problems = (await validator.problems(object as unknown as K8sObject)).join('\n');
    expect(problems).toMatch(/replicas/);
    expect(problems).toMatch(/name/);
  });

  it('reports names and labels the API server refuses', async () => {
    const object = deployment();
    object.metadata.name = 'Demo_App';
    object.metadata.labels = { 'app.kubernetes.io/name': 'x'.repeat(64) };
    const problems = await validator.problems(object);
    expect(problems.join('\n')).toMatch(/metadata.name "Demo_App" is not a valid DNS label/);
    expect(problems.join('\n')).toMatch(/bad label value/);
  });

  it('checks the ServiceMonitor CRD, unknown fields included', async () => {
    const monitor: K8sObject = {
      apiVersion: 'monitoring.coreos.com/v1',
      kind: 'ServiceMonitor',
      metadata: { name: 'demo' },
      spec: {
        selector: { matchLabels: { app: 'demo' } },
        endpoints: [{ port: 'metrics', intervall: '30s' }],
      },
    };
    expect(await validator.problems(monitor)).toEqual([
      'ServiceMonitor/demo: unknown field spec.endpoints[0].intervall',
    ]);
  });

  it('checks the cert-manager Certificate: unknown fields, required fields, DNS names', async () => {
    const certificate = (): K8sObject & { spec: Record<string, unknown> } => ({
      apiVersion: 'cert-manager.io/v1',
      kind: 'Certificate',
      metadata: { name: 'demo', namespace: 'demo' },
      spec: {
        secretName: 'demo-tls',
        dnsNames: ['demo', 'demo.demo.svc'],
        privateKey: { algorithm: 'ECDSA', size: 256, rotationPolicy: 'Always' },
        issuerRef: { name: 'ca', kind: 'ClusterIssuer', group: 'cert-manager.io' },
      },
    });
    expect(await validator.problems(certificate())).toEqual([]);
    const typo = certificate();
    typo.spec.dnsName = typo.spec.dnsNames;
    delete typo.spec.dnsNames;
    expect(await validator.problems(typo)).toEqual([
      'Certificate/demo: spec needs one of commonName, dnsNames, ipAddresses, uris, emailAddresses',
      'Certificate/demo: unknown field spec.dnsName',
    ]);
    const bad = certificate();
    bad.spec.issuerRef = { kind: 'ClusterIssuer' };
    bad.spec.dnsNames = ['Demo_Service'];
    bad.spec.privateKey = { algorithm: 'ECDSA', size: 2048 };
    const problems = (await validator.problems(bad)).join('\n');
    expect(problems).toContain('spec.issuerRef.name is required');
    expect(problems).toContain('spec.dnsNames: "Demo_Service" is not a DNS name');
    expect(problems).toContain('spec.privateKey.size 2048 does not fit the algorithm');
  });

  it('refuses a kind it has no schema for', async () => {
    const problems = await validator.problems({
      apiVersion: 'example.com/v1',
      kind: 'Widget',
      metadata: { name: 'w' },
    });
    expect(problems).toEqual(['Widget/w: no schema for example.com/v1 Widget']);
  });
});
