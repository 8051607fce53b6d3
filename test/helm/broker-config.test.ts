/**
 * What the chart hands the broker is a configuration the broker accepts: for each values file the
 * rendered ConfigMap and container env (secrets and downward-API fields filled in, mounted files
 * written to a temporary folder) go through the broker's own loadConfig().
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { loadConfig } from '../../broker/config.js';
import { telemetrySettings } from '../../shared/telemetry/telemetry-settings.js';
import { expectValid, prepareValidator } from './chart-checks.js';
import { find, findAll, HelmCharts, type K8sObject } from './helm-harness.js';

// A well-formed sealing key for Secrets the chart does not render (existingSecret).
const SEALING_KEYS = `k1:${Buffer.alloc(32, 7).toString('base64')}`;

interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: {
    fieldRef?: { fieldPath: string };
    secretKeyRef?: { name: string; key: string };
  };
}
interface KeyToPath {
  key: string;
  path: string;
}
interface Volume {
  name: string;
  secret?: { secretName: string; items?: KeyToPath[] };
  configMap?: { name: string; items?: KeyToPath[] };
  projected?: {
    sources: Array<{
      serviceAccountToken?: { path: string };
      configMap?: { items: KeyToPath[] };
      secret?: { name: string; items: KeyToPath[] };
      downwardAPI?: { items: Array<{ path: string }> };
    }>;
  };
}
interface BrokerPod {
  containers: Array<{
    env: EnvVar[];
    envFrom: Array<{ configMapRef: { name: string } }>;
    volumeMounts: Array<{ name: string; mountPath: string }>;
  }>;
  volumes: Volume[];
}

let charts: HelmCharts;
let dir: string;
beforeAll(() => {
  charts = HelmCharts.setUp();
  prepareValidator();
  dir = mkdtempSync(join(tmpdir(), 'tb-broker-env-'));
}, 120_000);
afterAll(() => {
  charts?.tearDown();
  rmSync(dir, { recursive: true, force: true });
});

/** The broker container's environment as the kubelet would build it, files included. */
function kubeletEnv(objects: K8sObject[], scenario: string): Record<string, string> {
  const secretValue = (name: string, key: string): string => {
    const secrets = findAll(objects, 'Secret') as Array<
      K8sObject & { stringData?: Record<string, string>; data?: Record<string, string> }
    >;
    const secret = secrets.find((s) => s.metadata.name === name);
    if (secret?.stringData) return secret.stringData[key]!;
    if (secret?.data) return Buffer.from(secret.data[key]!, 'base64').toString('utf8');
    return key === 'sealing-keys' ? SEALING_KEYS : `value-of-${name}-${key}`;
  };
  // A ConfigMap the chart does not render (yours, or the cluster's) holds a stand-in value.
  const configValue = (name: string, key: string): string => {
    const config = findAll(objects, 'ConfigMap').find((c) => c.metadata.name === name) as
      (K8sObject & { data: Record<string, string> }) | undefined;
    return config ? config.data[key]! : `value-of-${name}-${key}`;
  };
  const pod = (
    find(objects, 'Deployment') as unknown as { spec: { template: { spec: BrokerPod } } }
  ).spec.template.spec;
  const container = pod.containers[0]!;
  const mounts = new Map<string, string>();
  for (const mount of container.volumeMounts) {
    const volume = pod.volumes.find((v) => v.name === mount.name)!;
    const local = join(dir, scenario, mount.name);
    mkdirSync(local, { recursive: true });
    for (const item of volume.secret?.items ?? [])
      writeFileSync(join(local, item.path), secretValue(volume.secret!.secretName, item.key));
    if (volume.configMap) {
      const { name, items } = volume.configMap;
      const config = findAll(objects, 'ConfigMap').find((c) => c.metadata.name === name) as
        (K8sObject & { data: Record<string, string> }) | undefined;
      const keys = items ?? Object.keys(config?.data ?? {}).map((key) => ({ key, path: key }));
      for (const item of keys) writeFileSync(join(local, item.path), configValue(name, item.key));
    }
    for (const source of volume.projected?.sources ?? []) {
      if (source.serviceAccountToken)
        writeFileSync(join(local, source.serviceAccountToken.path), 'not-a-real-token');
      for (const item of source.configMap?.items ?? [])
        writeFileSync(join(local, item.path), `value-of-${item.key}`);
      for (const item of source.secret?.items ?? [])
        writeFileSync(join(local, item.path), secretValue(source.secret!.name, item.key));
      for (const item of source.downwardAPI?.items ?? [])
        writeFileSync(join(local, item.path), 'token-broker');
    }
    mounts.set(mount.mountPath, local);
  }
  const env: Record<string, string> = {};
  for (const from of container.envFrom) {
    const config = find(objects, 'ConfigMap', from.configMapRef.name) as K8sObject & {
      data: Record<string, string>;
    };
    Object.assign(env, config.data);
  }
  for (const variable of container.env) {
    let value = variable.value ?? '';
    if (variable.valueFrom?.fieldRef) value = 'token-broker-7d9f-abcde';
    const ref = variable.valueFrom?.secretKeyRef;
    if (ref) value = secretValue(ref.name, ref.key);
    value = value.replace(/\$\(([A-Z0-9_]+)\)/g, (_, name: string) => env[name] ?? `$(${name})`);
    const mount = [...mounts].find(([path]) => value === path || value.startsWith(`${path}/`));
    if (mount) value = mount[1] + value.slice(mount[0].length);
    env[variable.name] = value;
  }
  return env;
}

describe('the broker accepts the configuration the chart renders', () => {
  const scenarios: Array<[string, string[]]> = [
    ['defaults', ['minimal.yaml']],
    ['external Redis, existing Secret', ['minimal.yaml', 'external-redis.yaml']],
    ['external Sentinel', ['minimal.yaml', 'external-sentinel.yaml']],
    ['external Cluster', ['minimal.yaml', 'external-cluster.yaml']],
    ['HPA, metrics, OTel, broker.env', ['minimal.yaml', 'hpa-servicemonitor.yaml']],
    ['FOLIO', ['folio.yaml']],
    ['TLS from cert-manager', ['minimal.yaml', 'tls-cert-manager.yaml']],
    ['TLS from an existing Secret', ['minimal.yaml', 'tls-existing-secret.yaml']],
    ['a policy, modules in two namespaces', ['minimal.yaml', 'auth-policy.yaml']],
    ['keys from a JWKS file', ['minimal.yaml', 'auth-jwks.yaml']],
    ['plaintext, no caller check', ['minimal.yaml', 'insecure.yaml']],
  ];
  for (const [name, files] of scenarios)
    it(name, () => {
      const env = kubeletEnv(charts.render(charts.broker, files), name.replace(/\W+/g, '-'));
      const config = loadConfig(env);
      // Bundled: state on the Sentinel-watched store; external here: one URL. Both with the
      // password from its file, never from a variable.
      const store = config.stateStore!;
      if (store.kind === 'single') expect(store.url).toMatch(/^redis:\/\/:[^$]+@/);
      else if (name === 'external Cluster') {
        expect(store).toMatchObject({ kind: 'cluster', nodes: [{ port: 6379 }, { port: 6379 }] });
        expect(config.sessionRetentionMs).toBe(86_400_000);
      } else if (name === 'external Sentinel') {
        expect(store).toMatchObject({ kind: 'sentinel', master: 'tokens', tls: { ca: undefined } });
        expect(store.kind === 'sentinel' && store.sentinelPassword).toBe(
          'value-of-sentinel-credentials-password',
        );
        expect(config.redisMinReplicas).toBe(1);
      } else {
        expect(store.kind).toBe('sentinel');
        expect(store.password).toMatch(/^[^$]{8,}$/);
        expect(store.kind === 'sentinel' && store.sentinelPassword).toBe(store.password);
        expect(config.redisMinReplicas).toBeUndefined();
      }
      for (const url of config.redlockUrls) expect(url).toMatch(/^rediss?:\/\/:[^$]+@/);
      expect(config.redlockUrls.length).toBeGreaterThanOrEqual(3);
      expect(config.grpcAddress).toBe('0.0.0.0:50051');
      expect(config.replicaId).toBe('token-broker-7d9f-abcde');
    });

  it('with FOLIO: the gateway, and no OAuth2 client', () => {
    const env = kubeletEnv(charts.render(charts.broker, ['folio.yaml']), 'folio-check');
    expect(Object.keys(env).filter((k) => /^TB_IDP_(CLIENT|AUTH_METHOD|ISSUER)/.test(k))).toEqual(
      [],
    );
    expect(env.TB_SECRETS_DIR).toBeDefined();
    expect(JSON.stringify(loadConfig(env))).toContain('https://okapi.folio.example.org');
  });

  it('with several IdPs: the file TB_IDPS_FILE reads, each client secret from its Secret key', async () => {
    const objects = charts.render(charts.broker, ['idps.yaml']);
    await expectValid(objects);
    const env = kubeletEnv(objects, 'idps');
    // The single-IdP variables would make the broker refuse the file; the two timeouts are the
    // entries' defaults.
    expect(Object.keys(env).filter((k) => k.startsWith('TB_IDP_'))).toEqual([
      'TB_IDP_TIMEOUT_MS',
      'TB_IDP_ANSWER_WAIT_MS',
    ]);
    // Paths inside the file are the container's: map the secrets' mount to where it was written.
    const mount = (
      find(objects, 'Deployment') as unknown as { spec: { template: { spec: BrokerPod } } }
    ).spec.template.spec.containers[0]!.volumeMounts.find((m) => m.name === 'idp-secrets')!;
    const text = readFileSync(env.TB_IDPS_FILE!, 'utf8');
    expect(text).toContain(`${mount.mountPath}/keycloak`);
    writeFileSync(
      env.TB_IDPS_FILE!,
      text.replaceAll(mount.mountPath, join(dir, 'idps', 'idp-secrets')),
    );
    const config = loadConfig(env);
    expect(config.idps.map((i) => [i.name, i.type])).toEqual([
      ['keycloak', 'oauth2'],
      ['folio', 'folio'],
    ]);
    expect(config.idps.map((i) => i.timeoutMs)).toEqual([5000, 8000]);
    // The client secret is the file of the Secret key clientSecretRef names, never in a ConfigMap.
    const serialized = JSON.stringify(config.idps[0]);
    expect(serialized).toContain('value-of-idp-secrets-keycloak-secret');
    const configs = findAll(objects, 'ConfigMap').map((c) => JSON.stringify(c));
    expect(configs.join('\n')).not.toContain('value-of-idp-secrets');
    expect(
      findAll(objects, 'Secret')
        .map((x) => JSON.stringify(x))
        .join('\n'),
    ).not.toContain('idp-client-secret');
  });

  it('fails where the broker would: a folio IdP given an OAuth2 setting through broker.env', () => {
    // The schema keeps chart-managed names out of broker.env; this one is the broker's to refuse.
    const env = kubeletEnv(charts.render(charts.broker, ['folio.yaml']), 'folio-bad');
    expect(() => loadConfig({ ...env, TB_IDP_SCOPE: 'openid' })).toThrow(/TB_IDP_SCOPE/);
  });
});

describe('the files the TLS, identity and policy settings name', () => {
  // What the broker will read: the contract's variables, each naming a file that exists.
  it('exist in the container, with the rendered certificate, policy and JWKS', () => {
    const objects = charts.render(charts.broker, ['minimal.yaml', 'auth-policy.yaml']);
    const env = kubeletEnv(objects, 'files-discovery');
    for (const name of [
      'TB_TLS_CERT_FILE',
      'TB_TLS_KEY_FILE',
      'TB_POLICY_FILE',
      'TB_AUTH_ISSUER_CA_FILE',
      'TB_AUTH_ISSUER_TOKEN_FILE',
    ])
      expect(existsSync(env[name]!), name).toBe(true);
    expect(readFileSync(env.TB_TLS_CERT_FILE!, 'utf8')).toMatch(/^-----BEGIN CERTIFICATE-----/);
    expect(parse(readFileSync(env.TB_POLICY_FILE!, 'utf8'))).toMatchObject({
      rules: [{ name: 'folio-modules' }, { subjects: ['folio-jobs/enroller'] }],
    });
    expect(env.TB_AUTH_ISSUER).toBe('https://kubernetes.default.svc.cluster.local');
    expect(env.TB_AUTH_AUDIENCE).toBe('token-broker');

    const jwks = kubeletEnv(
      charts.render(charts.broker, ['minimal.yaml', 'auth-jwks.yaml']),
      'files-jwks',
    );
    expect(JSON.parse(readFileSync(jwks.TB_AUTH_JWKS_FILE!, 'utf8'))).toMatchObject({
      keys: [{ kid: 'test-key-1' }],
    });
  });
});

describe('telemetry as the chart switches it (the broker reads the same env at --import)', () => {
  it('off by default: OTEL_SDK_DISABLED=true', () => {
    const env = kubeletEnv(charts.render(charts.broker, ['minimal.yaml']), 'otel-off');
    expect(env.OTEL_SDK_DISABLED).toBe('true');
    expect(telemetrySettings(env)).toMatchObject({ enabled: false, metricExporters: [] });
  });

  it('metrics only: the Prometheus exporter on 0.0.0.0:9464, no traces', () => {
    const objects = charts.render(
      charts.broker,
      ['minimal.yaml'],
      ['--set', 'metrics.enabled=true'],
    );
    const settings = telemetrySettings(kubeletEnv(objects, 'otel-metrics'));
    expect(settings).toMatchObject({
      enabled: true,
      traceExporters: [],
      metricExporters: ['prometheus'],
      prometheus: { host: '0.0.0.0', port: 9464 },
    });
    const port = (
      find(objects, 'Deployment') as unknown as {
        spec: {
          template: {
            spec: { containers: Array<{ ports: Array<{ name: string; containerPort: number }> }> };
          };
        };
      }
    ).spec.template.spec.containers[0]!.ports.find((p) => p.name === 'metrics');
    expect(port?.containerPort).toBe(settings.prometheus.port);
  });

  it('metrics and OTLP traces', () => {
    const env = kubeletEnv(
      charts.render(charts.broker, ['minimal.yaml', 'hpa-servicemonitor.yaml']),
      'otel-on',
    );
    expect(telemetrySettings(env)).toMatchObject({
      enabled: true,
      traceExporters: ['otlp'],
      metricExporters: ['prometheus'],
    });
    expect(env.OTEL_EXPORTER_OTLP_ENDPOINT).toBe('http://otel-collector.observability.svc:4317');
    expect(env.OTEL_RESOURCE_ATTRIBUTES).toContain('k8s.pod.name=token-broker-7d9f-abcde');
    expect(telemetrySettings(env).clientSpans).toEqual({ redis: false, http: false });
    const debugging = kubeletEnv(
      charts.render(
        charts.broker,
        ['minimal.yaml', 'hpa-servicemonitor.yaml'],
        ['--set-json', 'otel.clientSpans=["redis","http"]'],
      ),
      'otel-redis',
    );
    expect(telemetrySettings(debugging).clientSpans).toEqual({ redis: true, http: true });
  });
});
