/**
 * The Helm charts, rendered by a real helm (4.x) and checked object by object: every object
 * validates against the Kubernetes schemas (unknown fields included), and the wiring between
 * objects holds (selectors, ports, names, the sidecar label the NetworkPolicy admits).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import {
  brokerContainer,
  env,
  expectConsistent,
  expectValid,
  prepareValidator,
  type Service,
  type Workload,
} from './chart-checks.js';
import { find, findAll, HelmCharts, VALUES, type K8sObject } from './helm-harness.js';

let charts: HelmCharts;

beforeAll(() => {
  charts = HelmCharts.setUp();
  prepareValidator();
}, 120_000);
afterAll(() => charts?.tearDown());

describe('token-broker chart', () => {
  it('passes helm lint --strict', () => {
    const result = charts.run([
      'lint',
      '--strict',
      charts.broker,
      '-f',
      join(VALUES, 'minimal.yaml'),
    ]);
    expect(result.stderr + result.stdout).toMatch(/1 chart\(s\) linted, 0 chart\(s\) failed/);
    expect(result.ok).toBe(true);
  });

  describe('with defaults (and the required values)', () => {
    let objects: K8sObject[];
    beforeAll(() => {
      objects = charts.render(charts.broker, ['minimal.yaml']);
    });

    it('renders only objects that validate, unknown fields included', async () => {
      await expectValid(objects);
      expectConsistent(objects);
    });

    it('runs 3 broker replicas, spread, non-root, read-only, with gRPC probes on 50051', () => {
      const deployment = find(objects, 'Deployment') as Workload;
      expect(deployment.spec.replicas).toBe(3);
      const pod = deployment.spec.template.spec;
      expect(pod.topologySpreadConstraints?.map((t) => t.topologyKey)).toEqual([
        'topology.kubernetes.io/zone',
        'kubernetes.io/hostname',
      ]);
      expect(pod.securityContext).toMatchObject({ runAsNonRoot: true, runAsUser: 1000 });
      const broker = pod.containers[0]!;
      expect(broker.securityContext).toMatchObject({
        readOnlyRootFilesystem: true,
        allowPrivilegeEscalation: false,
        capabilities: { drop: ['ALL'] },
      });
      for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe'])
        expect(broker[probe], probe).toMatchObject({ grpc: { port: 50051 } });
      expect(broker.readinessProbe).toMatchObject({
        grpc: { service: 'tokenbroker.v1.TokenBrokerService' },
      });
      expect(broker.ports).toContainEqual({ name: 'grpc', containerPort: 50051, protocol: 'TCP' });
    });

    it('gives the broker time to finish a rotation and drain its streams on SIGTERM', () => {
      const pod = (find(objects, 'Deployment') as Workload).spec.template.spec;
      const config = find(objects, 'ConfigMap', 'token-broker') as K8sObject & {
        data: Record<string, string>;
      };
      const needMs =
        Number(config.data.TB_IDP_TIMEOUT_MS) +
        Number(config.data.TB_PERSIST_RETRY_MS) +
        Number(config.data.TB_SHUTDOWN_GRACE_MS);
      expect(pod.terminationGracePeriodSeconds! * 1000).toBeGreaterThan(needMs);
    });

    it('reads the secrets from files of a mounted Secret, never from the ConfigMap', () => {
      const broker = brokerContainer(objects);
      expect(env(broker, 'TB_SEALING_KEYS_FILE')?.value).toBe(
        '/var/run/secrets/token-broker/sealing-keys',
      );
      expect(env(broker, 'TB_IDP_CLIENT_SECRET_FILE')?.value).toBe(
        '/var/run/secrets/token-broker/idp-client-secret',
      );
      const secret = find(objects, 'Secret', 'token-broker') as K8sObject & {
        stringData: Record<string, string>;
      };
      expect(Object.keys(secret.stringData).sort()).toEqual(['idp-client-secret', 'sealing-keys']);
      const config = find(objects, 'ConfigMap', 'token-broker') as K8sObject & {
        data: Record<string, string>;
      };
      expect(Object.keys(config.data).filter((k) => /SECRET|SEALING|PASSWORD/.test(k))).toEqual([]);
      expect(config.data).toMatchObject({
        TB_IDP_ISSUER: 'https://idp.example.com/realms/folio',
        TB_IDP_CLIENT_ID: 'token-broker',
        TB_GRPC_ADDRESS: '0.0.0.0:50051',
      });
    });

    it('bundles 3 independent Redis masters with AOF, and points Redlock at all of them', () => {
      const redis = find(objects, 'StatefulSet', 'token-broker-redis') as Workload;
      expect(redis.spec.replicas).toBe(3);
      const conf = (
        find(objects, 'ConfigMap', 'token-broker-redis') as K8sObject & {
          data: { 'redis.conf': string };
        }
      ).data['redis.conf'];
      expect(conf).toMatch(/^appendonly yes$/m);
      expect(conf).toMatch(/^appendfsync always$/m);
      expect(conf).not.toMatch(/replicaof|slaveof/);
      const broker = brokerContainer(objects);
      const hosts = env(broker, 'TB_REDLOCK_URLS')!
        .value!.split(',')
        .map((url) => new URL(url).hostname);
      const service = redis.spec.serviceName!;
      expect(hosts).toEqual(
        [0, 1, 2].map((i) => `token-broker-redis-${i}.${service}.token-broker.svc.cluster.local`),
      );
      // State is not on a lock node: it is on the replicated store (next test).
      expect(env(broker, 'TB_REDIS_URL')).toBeUndefined();
      // The password is a mounted file the broker puts into the URLs, in no variable.
      for (const url of env(broker, 'TB_REDLOCK_URLS')!.value!.split(','))
        expect(new URL(url).password).toBe('');
      expect(env(broker, 'TB_REDIS_PASSWORD')).toBeUndefined();
      expect(env(broker, 'TB_REDIS_PASSWORD_FILE')?.value).toBe(
        '/var/run/secrets/token-broker-redis/redis-password',
      );
      const brokerPod = (find(objects, 'Deployment') as Workload).spec.template.spec;
      expect(brokerPod.volumes?.find((v) => v.name === 'redis-password')).toMatchObject({
        secret: {
          secretName: 'token-broker-redis',
          items: [{ key: 'redis-password', path: 'redis-password' }],
        },
      });
      const redisPod = redis.spec.template.spec;
      expect(redisPod.containers[0]!.env).toBeUndefined();
      expect(redisPod.volumes?.find((v) => v.name === 'password')).toMatchObject({
        secret: { secretName: 'token-broker-redis' },
      });
    });

    it('lets only labelled pods open connections to the broker, and only the broker reach Redis', () => {
      const [brokerPolicy, redisPolicy] = ['token-broker', 'token-broker-redis'].map(
        (name) =>
          find(objects, 'NetworkPolicy', name) as K8sObject & {
            spec: {
              podSelector: { matchLabels: Record<string, string> };
              ingress: Array<{
                ports: Array<{ port: number }>;
                from: Array<Record<string, unknown>>;
              }>;
            };
          },
      );
      expect(brokerPolicy!.spec.ingress).toEqual([
        {
          ports: [{ port: 50051, protocol: 'TCP' }],
          from: [{ podSelector: { matchLabels: { 'token-broker.io/sidecar': 'true' } } }],
        },
      ]);
      const brokerLabels = (find(objects, 'Deployment') as Workload).spec.template.metadata.labels;
      expect(redisPolicy!.spec.ingress).toHaveLength(1);
      const from = redisPolicy!.spec.ingress[0]!.from as Array<{
        podSelector: { matchLabels: Record<string, string> };
      }>;
      for (const [k, v] of Object.entries(from[0]!.podSelector.matchLabels))
        expect(brokerLabels[k]).toBe(v);
    });

    it('bundles the state on a master, 2 replicas and 3 sentinels, which the broker asks', () => {
      const state = find(objects, 'StatefulSet', 'token-broker-state') as Workload;
      expect(state.spec.replicas).toBe(3);
      const pod = state.spec.template.spec;
      expect(pod.containers.map((c) => c.name)).toEqual(['redis', 'sentinel']);
      const scripts = (
        find(objects, 'ConfigMap', 'token-broker-state') as K8sObject & {
          data: Record<string, string>;
        }
      ).data;
      // Pod 0 is the first master; a pod that starts later follows what the sentinels say.
      expect(scripts['find-master.sh']).toMatch(/sentinel get-master-addr-by-name tbstate/);
      expect(scripts['start-redis.sh']).toMatch(/replicaof \$master 6379/);
      expect(scripts['start-sentinel.sh']).toMatch(/sentinel monitor tbstate \$master 6379 2/);
      expect(scripts['redis.conf']).toMatch(/^appendonly yes$/m);
      // No password in any script or configuration: it is read from the mounted Secret.
      expect(JSON.stringify(scripts)).not.toMatch(/requirepass "[^$]/);
      const broker = brokerContainer(objects);
      const service = state.spec.serviceName!;
      expect(env(broker, 'TB_REDIS_SENTINELS')?.value).toBe(
        [0, 1, 2]
          .map((i) => `token-broker-state-${i}.${service}.token-broker.svc.cluster.local:26379`)
          .join(','),
      );
      expect(env(broker, 'TB_REDIS_SENTINEL_MASTER')?.value).toBe('tbstate');
      expect(env(broker, 'TB_REDIS_SENTINEL_PASS_FILE')?.value).toBe(
        '/var/run/secrets/token-broker-redis/redis-password',
      );
      // Any one of the three may be taken by a voluntary disruption, not two.
      const pdb = find(objects, 'PodDisruptionBudget', 'token-broker-state') as K8sObject & {
        spec: { maxUnavailable: number };
      };
      expect(pdb.spec.maxUnavailable).toBe(1);
    });

    it('limits CPU and memory of every container: broker, Redis, the sidecar of a module', () => {
      const example = charts.render(charts.example);
      const workloads = [
        ...findAll(objects, 'Deployment'),
        ...findAll(objects, 'StatefulSet'),
        ...findAll(example, 'Deployment'),
      ] as Workload[];
      const limits = new Map<string, unknown>();
      for (const workload of workloads) {
        const pod = workload.spec.template.spec;
        // The example's own module container is the module author's to size.
        for (const container of [...pod.containers, ...(pod.initContainers ?? [])])
          if (container.name !== 'module')
            limits.set(
              `${workload.metadata.name}/${container.name}`,
              (container as { resources?: { limits?: unknown } }).resources?.limits,
            );
      }
      expect(Object.fromEntries(limits)).toEqual({
        'token-broker/broker': { cpu: '1000m', memory: '512Mi' },
        'token-broker-redis/redis': { cpu: '500m', memory: '256Mi' },
        'token-broker-state/redis': { cpu: '500m', memory: '256Mi' },
        'token-broker-state/sentinel': { cpu: '500m', memory: '256Mi' },
        'token-broker-module-app/token-broker-sidecar': { cpu: '500m', memory: '128Mi' },
      });
    });

    it('carries the standard app.kubernetes.io labels on every object', () => {
      for (const object of objects)
        expect(object.metadata.labels, `${object.kind}/${object.metadata.name}`).toMatchObject({
          'app.kubernetes.io/name': 'token-broker',
          'app.kubernetes.io/instance': 'token-broker',
          'app.kubernetes.io/managed-by': 'Helm',
          'app.kubernetes.io/version': '0.1.0',
        });
    });

    it('renders no HPA and no ServiceMonitor unless asked', () => {
      expect(findAll(objects, 'HorizontalPodAutoscaler')).toEqual([]);
      expect(findAll(objects, 'ServiceMonitor')).toEqual([]);
      expect(env(brokerContainer(objects), 'OTEL_SDK_DISABLED')?.value).toBe('true');
    });
  });

  describe('with external Redis and an existing Secret', () => {
    let objects: K8sObject[];
    beforeAll(() => {
      objects = charts.render(charts.broker, ['minimal.yaml', 'external-redis.yaml']);
    });

    it('renders only objects that validate, unknown fields included', async () => {
      await expectValid(objects);
      expectConsistent(objects);
    });

    it('bundles no Redis and wires the given URLs, password from the given Secret', () => {
      expect(findAll(objects, 'StatefulSet')).toEqual([]);
      // Only the generated TLS pair: no Redis password, no secrets of the broker's own.
      expect(findAll(objects, 'Secret').map((s) => s.metadata.name)).toEqual(['token-broker-tls']);
      const broker = brokerContainer(objects);
      expect(env(broker, 'TB_REDIS_PASSWORD')).toBeUndefined();
      expect(env(broker, 'TB_REDIS_PASSWORD_FILE')?.value).toBe(
        '/var/run/secrets/token-broker-redis/redis-password',
      );
      expect(env(broker, 'TB_REDIS_URL')?.value).toBe('redis://redis-state.data.svc:6379');
      expect(env(broker, 'TB_REDLOCK_URLS')?.value?.split(',')).toHaveLength(3);
      const pod = (find(objects, 'Deployment') as Workload).spec.template.spec;
      expect(pod.volumes?.find((v) => v.name === 'redis-password')).toMatchObject({
        secret: {
          secretName: 'redis-credentials',
          items: [{ key: 'password', path: 'redis-password' }],
        },
      });
      expect(pod.volumes?.find((v) => v.name === 'secrets')).toMatchObject({
        secret: { secretName: 'token-broker-secrets' },
      });
    });

    it('admits sidecars from every namespace and lets the broker reach Redis on 6379', () => {
      const policy = find(objects, 'NetworkPolicy') as K8sObject & {
        spec: {
          ingress: Array<{ from: unknown[] }>;
          egress: Array<{ ports: Array<{ port: number }>; to?: unknown }>;
        };
      };
      expect(policy.spec.ingress[0]!.from).toEqual([
        {
          podSelector: { matchLabels: { 'token-broker.io/sidecar': 'true' } },
          namespaceSelector: {},
        },
      ]);
      expect(policy.spec.egress.map((rule) => rule.ports.map((p) => p.port))).toEqual([
        [53, 53],
        [6379],
        [443],
        // The issuer's discovery: the API server's Service port and what it is translated to.
        [443, 6443],
      ]);
    });
  });

  describe('with HPA, metrics, ServiceMonitor and OTel on', () => {
    let objects: K8sObject[];
    beforeAll(() => {
      objects = charts.render(charts.broker, ['minimal.yaml', 'hpa-servicemonitor.yaml']);
    });

    it('renders only objects that validate, unknown fields included', async () => {
      await expectValid(objects);
      expectConsistent(objects);
    });

    it('scales the broker Deployment, which then leaves replicas to the HPA', () => {
      const hpa = find(objects, 'HorizontalPodAutoscaler') as K8sObject & {
        spec: {
          scaleTargetRef: { kind: string; name: string };
          minReplicas: number;
          maxReplicas: number;
        };
      };
      const deployment = find(objects, 'Deployment') as Workload;
      expect(hpa.spec.scaleTargetRef).toMatchObject({
        kind: 'Deployment',
        name: deployment.metadata.name,
      });
      expect([hpa.spec.minReplicas, hpa.spec.maxReplicas]).toEqual([3, 8]);
      expect(deployment.spec.replicas).toBeUndefined();
    });

    it('points the ServiceMonitor at a Service port that reaches the metrics container port', () => {
      const monitor = find(objects, 'ServiceMonitor') as K8sObject & {
        spec: {
          selector: { matchLabels: Record<string, string> };
          endpoints: Array<{ port: string }>;
        };
      };
      expect(monitor.metadata.labels).toMatchObject({ release: 'kube-prometheus-stack' });
      const selected = (findAll(objects, 'Service') as Service[]).filter((s) =>
        Object.entries(monitor.spec.selector.matchLabels).every(
          ([k, v]) => s.metadata.labels?.[k] === v,
        ),
      );
      expect(selected.map((s) => s.metadata.name)).toEqual(['token-broker-headless']);
      const port = selected[0]!.spec.ports.find((p) => p.name === monitor.spec.endpoints[0]!.port);
      expect(port?.targetPort).toBe('metrics');
      const broker = brokerContainer(objects);
      expect(broker.ports).toContainEqual({
        name: 'metrics',
        containerPort: 9464,
        protocol: 'TCP',
      });
      expect(env(broker, 'OTEL_METRICS_EXPORTER')?.value).toBe('prometheus');
      expect(env(broker, 'OTEL_EXPORTER_PROMETHEUS_PORT')?.value).toBe('9464');
      expect(env(broker, 'OTEL_EXPORTER_OTLP_ENDPOINT')?.value).toBe(
        'http://otel-collector.observability.svc:4317',
      );
      expect(env(broker, 'OTEL_RESOURCE_ATTRIBUTES')?.value).toBe(
        'k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME),deployment.environment=prod',
      );
    });

    it('passes broker.env through and opens the metrics port to the monitoring namespace', () => {
      const config = find(objects, 'ConfigMap', 'token-broker') as K8sObject & {
        data: Record<string, string>;
      };
      expect(config.data).toMatchObject({
        TB_REFRESH_RATIO: '0.8',
        TB_LOCK_TTL_MS: '20000',
        TB_LOG_LEVEL: 'debug',
      });
      const policy = find(objects, 'NetworkPolicy', 'token-broker') as K8sObject & {
        spec: { ingress: Array<{ ports: Array<{ port: number }>; from: unknown[] }> };
      };
      expect(policy.spec.ingress.map((rule) => rule.ports[0]!.port)).toEqual([50051, 9464]);
      expect(policy.spec.ingress[0]!.from).toEqual([
        {
          podSelector: { matchLabels: { 'token-broker.io/sidecar': 'true' } },
          namespaceSelector: { matchLabels: { 'token-broker.io/sidecars': 'allowed' } },
        },
      ]);
      // metricsFrom, when set, is the whole list of scrapers.
      expect(policy.spec.ingress[1]!.from).toEqual([
        { namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'monitoring' } } },
      ]);
    });
  });

  describe('the metrics port in the NetworkPolicy', () => {
    type Policy = K8sObject & {
      spec: { ingress: Array<{ ports: Array<{ port: number }>; from?: unknown[] }> };
    };
    const metricsRule = (...set: string[]) => {
      const objects = charts.render(
        charts.broker,
        ['minimal.yaml'],
        ['--set', 'metrics.enabled=true', ...set.flatMap((s) => ['--set', s])],
      );
      const policy = find(objects, 'NetworkPolicy', 'token-broker') as Policy;
      expect(policy.spec.ingress[0]!.ports[0]!.port).toBe(50051);
      return policy.spec.ingress.find((rule) => rule.ports[0]!.port === 9464);
    };
    const inMonitoring = {
      matchExpressions: [
        { key: 'kubernetes.io/metadata.name', operator: 'In', values: ['monitoring'] },
      ],
    };

    it('is open by default to pods of the monitoring namespace only, never to any pod', () => {
      const rule = metricsRule();
      expect(rule?.from).toEqual([{ namespaceSelector: inMonitoring }]);
    });

    it('names the scrapers by namespaces and pod labels from values', () => {
      expect(metricsRule('networkPolicy.metricsPodLabels.app=prometheus')?.from).toEqual([
        { namespaceSelector: inMonitoring, podSelector: { matchLabels: { app: 'prometheus' } } },
      ]);
      expect(metricsRule('networkPolicy.metricsNamespaces={observability,ops}')?.from).toEqual([
        {
          namespaceSelector: {
            matchExpressions: [
              {
                key: 'kubernetes.io/metadata.name',
                operator: 'In',
                values: ['observability', 'ops'],
              },
            ],
          },
        },
      ]);
      // Labels alone: pods of the release namespace with them.
      expect(
        metricsRule(
          'networkPolicy.metricsNamespaces=null',
          'networkPolicy.metricsPodLabels.app=prometheus',
        )?.from,
      ).toEqual([{ podSelector: { matchLabels: { app: 'prometheus' } } }]);
    });

    it('stays closed with no scraper named, and is absent with metrics off', () => {
      expect(metricsRule('networkPolicy.metricsNamespaces=null')).toBeUndefined();
      const objects = charts.render(charts.broker, ['minimal.yaml']);
      const policy = find(objects, 'NetworkPolicy', 'token-broker') as Policy;
      expect(policy.spec.ingress.map((rule) => rule.ports[0]!.port)).toEqual([50051]);
    });
  });

  describe('with a FOLIO IdP', () => {
    it('renders only objects that validate, with no OAuth2 client secret anywhere', async () => {
      const objects = charts.render(charts.broker, ['folio.yaml']);
      await expectValid(objects);
      expectConsistent(objects);
      const secret = find(objects, 'Secret', 'token-broker') as K8sObject & {
        stringData: Record<string, string>;
      };
      expect(Object.keys(secret.stringData)).toEqual(['sealing-keys']);
      const pod = (find(objects, 'Deployment') as Workload).spec.template.spec;
      expect(pod.volumes?.find((v) => v.name === 'logins')).toEqual({
        name: 'logins',
        secret: { secretName: 'folio-system-users', defaultMode: 0o440 },
      });
    });
  });

  it('prints NOTES with the address the example module dials, and no Redis password', () => {
    const bundled = charts.notes(charts.broker, ['minimal.yaml']);
    const example = charts.render(charts.example);
    const sidecar = (find(example, 'Deployment') as Workload).spec.template.spec
      .initContainers![0]!;
    const address = env(sidecar, 'TB_SIDECAR_BROKER_ADDRESS')!.value!;
    expect(bundled).toContain(`For sidecars:  ${address}`);
    expect(bundled).toContain('3 independent masters');
    const external = charts.notes(charts.broker, ['minimal.yaml', 'external-redis.yaml']);
    expect(external).toContain(
      'external, state at redis://redis-state.data.svc:6379 (password from Secret redis-credentials)',
    );
    expect(external).not.toContain('Redlock nodes');
  });

  it('refuses a termination grace period shorter than a rotation plus the shutdown grace', () => {
    const result = charts.template(
      charts.broker,
      ['minimal.yaml'],
      ['--set', 'broker.terminationGracePeriodSeconds=30'],
    );
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain(
      'broker.terminationGracePeriodSeconds (30) must be at least 65',
    );
  });
});

describe('example module chart with the sidecar library', () => {
  let broker: K8sObject[];
  beforeAll(() => {
    broker = charts.render(charts.broker, ['minimal.yaml']);
  });

  it('passes helm lint --strict, as does the library chart', () => {
    const result = charts.run(['lint', '--strict', charts.example, charts.sidecarLibrary]);
    expect(result.stdout).toMatch(/2 chart\(s\) linted, 0 chart\(s\) failed/);
    expect(result.ok).toBe(true);
  });

  describe('as a native sidecar (default)', () => {
    let objects: K8sObject[];
    let pod: Workload['spec']['template'];
    beforeAll(() => {
      objects = charts.render(charts.example);
      pod = (find(objects, 'Deployment') as Workload).spec.template;
    });

    it('renders only objects that validate, unknown fields included', async () => {
      await expectValid(objects);
      expectConsistent(objects);
    });

    it('runs the sidecar as a restartable init container, gated by a startup probe', () => {
      expect(pod.spec.initContainers?.map((c) => [c.name, c.restartPolicy])).toEqual([
        ['token-broker-sidecar', 'Always'],
      ]);
      expect(pod.spec.containers.map((c) => c.name)).toEqual(['module']);
      expect(pod.spec.initContainers![0]!.startupProbe).toBeDefined();
    });

    it('carries the label the broker NetworkPolicy admits', () => {
      const policy = find(broker, 'NetworkPolicy', 'token-broker') as K8sObject & {
        spec: {
          ingress: Array<{ from: Array<{ podSelector: { matchLabels: Record<string, string> } }> }>;
        };
      };
      for (const [k, v] of Object.entries(policy.spec.ingress[0]!.from[0]!.podSelector.matchLabels))
        expect(pod.metadata.labels[k], k).toBe(v);
    });

    it('dials the broker release headless Service on the gRPC port, by dns:/// for every replica', () => {
      const sidecar = pod.spec.initContainers![0]!;
      const address = env(sidecar, 'TB_SIDECAR_BROKER_ADDRESS')!.value!;
      const match = /^dns:\/\/\/([^.]+)\.([^.]+)\.svc\.cluster\.local:(\d+)$/.exec(address);
      expect(match, address).not.toBeNull();
      const headless = find(broker, 'Service', match![1]) as Service;
      expect(headless.spec.clusterIP).toBe('None');
      expect(match![2]).toBe('token-broker');
      expect(headless.spec.ports.map((p) => p.port)).toContain(Number(match![3]));
    });

    it('probes the 127.0.0.1-only server from inside the container, never by httpGet', () => {
      const sidecar = pod.spec.initContainers![0]!;
      for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
        const spec = sidecar[probe] as { exec?: { command: string[] }; httpGet?: unknown };
        expect(spec.httpGet, probe).toBeUndefined();
        expect(spec.exec?.command.slice(0, 2), probe).toEqual(['node', '-e']);
        expect(spec.exec?.command[2], probe).toContain('http://127.0.0.1:8181/');
      }
      expect(env(pod.spec.containers[0]!, 'TOKEN_BROKER_URL')?.value).toBe('http://127.0.0.1:8181');
    });

    it('mounts an audience-bound, projected ServiceAccount token into the sidecar alone', () => {
      const volume = pod.spec.volumes!.find((v) => v.name === 'token-broker-sa-token');
      expect(volume).toEqual({
        name: 'token-broker-sa-token',
        projected: {
          sources: [
            {
              serviceAccountToken: {
                audience: 'token-broker',
                expirationSeconds: 3600,
                path: 'token-broker',
              },
            },
          ],
        },
      });
      const sidecar = pod.spec.initContainers![0]!;
      expect(sidecar.volumeMounts).toContainEqual({
        name: 'token-broker-sa-token',
        mountPath: '/var/run/secrets/tokens',
        readOnly: true,
      });
      // The mount's directory and the projected path are the file the sidecar is told to read.
      expect(env(sidecar, 'TB_SIDECAR_TOKEN_FILE')?.value).toBe(
        '/var/run/secrets/tokens/token-broker',
      );
      for (const container of pod.spec.containers)
        expect(
          (container.volumeMounts ?? []).map((m) => m.name),
          `${container.name} mounts`,
        ).not.toContain('token-broker-sa-token');
    });
  });

  describe('as a regular container with a token directory', () => {
    let objects: K8sObject[];
    beforeAll(() => {
      objects = charts.render(charts.example, ['module-container-sidecar.yaml']);
    });

    it('renders only objects that validate, unknown fields included', async () => {
      await expectValid(objects);
      expectConsistent(objects);
    });

    it('puts the sidecar next to the module and shares the token directory read-only', () => {
      const pod = (find(objects, 'Deployment') as Workload).spec.template.spec;
      expect(pod.initContainers ?? []).toEqual([]);
      const [module, sidecar] = pod.containers;
      expect([module!.name, sidecar!.name]).toEqual(['module', 'token-broker-sidecar']);
      expect(sidecar!.restartPolicy).toBeUndefined();
      expect(env(sidecar!, 'TB_SIDECAR_TOKEN_DIR')?.value).toBe('/var/run/token-broker/tokens');
      expect(env(sidecar!, 'TB_SIDECAR_SAFETY_SKEW_MS')?.value).toBe('20000');
      expect(env(sidecar!, 'TB_SIDECAR_KEEPALIVE_MS')?.value).toBe('15000');
      expect(module!.volumeMounts).toContainEqual({
        name: 'token-broker-tokens',
        mountPath: '/var/run/token-broker/tokens',
        readOnly: true,
      });
    });
  });

  it('fails with a clear message on a misspelt sidecar setting or a missing broker address', () => {
    const typo = charts.template(charts.example, [], ['--set', 'tokenBroker.prot=1']);
    expect(typo.ok).toBe(false);
    expect(typo.stderr).toContain('tokenBroker.prot is not a sidecar setting');
    const missing = charts.template(charts.example, [], ['--set', 'tokenBroker.brokerAddress=']);
    expect(missing.ok).toBe(false);
    expect(missing.stderr).toContain('tokenBroker.brokerAddress is required');
    const managed = charts.template(
      charts.example,
      [],
      ['--set', 'tokenBroker.env.TB_SIDECAR_PORT=9'],
    );
    expect(managed.ok).toBe(false);
    expect(managed.stderr).toContain('tokenBroker.env.TB_SIDECAR_PORT is set by the chart');
  });
});
