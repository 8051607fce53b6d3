/**
 * What every chart test checks of a render: each object validates against its schema (unknown
 * fields included), and the wiring between objects holds. Shared by the chart test files.
 */
import { expect } from 'vitest';
import { find, findAll, type K8sObject } from './helm-harness.js';
import { K8sValidator, podContainers, type ContainerSpec } from './k8s-schema.js';

export interface PodSpec {
  containers: Container[];
  initContainers?: Container[];
  volumes?: Volume[];
  terminationGracePeriodSeconds?: number;
  securityContext?: Record<string, unknown>;
  topologySpreadConstraints?: Array<{ topologyKey: string }>;
  serviceAccountName?: string;
}
interface KeyToPath {
  key: string;
  path: string;
}
export interface Volume {
  name: string;
  secret?: { secretName: string; defaultMode?: number; items?: KeyToPath[] };
  configMap?: { name: string; items?: KeyToPath[] };
  projected?: {
    sources: Array<{
      serviceAccountToken?: { path: string; audience?: string; expirationSeconds?: number };
      configMap?: { name: string; items?: KeyToPath[] };
      downwardAPI?: unknown;
    }>;
  };
  [source: string]: unknown;
}
export interface Container extends ContainerSpec {
  name: string;
  env?: Array<{ name: string; value?: string; valueFrom?: Record<string, unknown> }>;
  envFrom?: Array<{ configMapRef?: { name: string } }>;
  volumeMounts?: Array<{ name: string; mountPath: string }>;
  securityContext?: Record<string, unknown>;
  restartPolicy?: string;
  command?: string[];
  [probe: string]: unknown;
}
export type Workload = K8sObject & {
  spec: {
    replicas?: number;
    selector: { matchLabels: Record<string, string> };
    serviceName?: string;
    volumeClaimTemplates?: Array<{ metadata: { name: string } }>;
    template: { metadata: { labels: Record<string, string> }; spec: PodSpec };
  };
};
export type Service = K8sObject & {
  spec: {
    clusterIP?: string;
    selector: Record<string, string>;
    ports: Array<{ name: string; port: number; targetPort: string | number }>;
  };
};

const ALL_KINDS = [
  ['v1', 'ConfigMap'],
  ['v1', 'Secret'],
  ['v1', 'Service'],
  ['v1', 'ServiceAccount'],
  ['apps/v1', 'Deployment'],
  ['apps/v1', 'StatefulSet'],
  ['policy/v1', 'PodDisruptionBudget'],
  ['autoscaling/v2', 'HorizontalPodAutoscaler'],
  ['networking.k8s.io/v1', 'NetworkPolicy'],
  ['monitoring.coreos.com/v1', 'ServiceMonitor'],
  ['rbac.authorization.k8s.io/v1', 'ClusterRoleBinding'],
  ['cert-manager.io/v1', 'Certificate'],
  ['admissionregistration.k8s.io/v1', 'MutatingWebhookConfiguration'],
].map(([apiVersion, kind]) => ({ apiVersion: apiVersion!, kind: kind! }));

export const env = (container: Container, name: string) =>
  container.env?.find((e) => e.name === name);

export const brokerContainer = (objects: K8sObject[]): Container =>
  (find(objects, 'Deployment') as Workload).spec.template.spec.containers[0]!;

let validator: K8sValidator | undefined;

/** Builds the validator (one TypeScript program for every kind: seconds), for a beforeAll. */
export function prepareValidator(): void {
  validator ??= new K8sValidator(ALL_KINDS);
}

/** Every object valid for the API server. */
export async function expectValid(objects: K8sObject[]): Promise<void> {
  prepareValidator();
  expect(objects.length).toBeGreaterThan(0);
  const problems = (await Promise.all(objects.map((o) => validator!.problems(o)))).flat();
  expect(problems).toEqual([]);
}

/** Wiring the API server cannot check: what a cluster would only show by not working. */
export function expectConsistent(objects: K8sObject[]): void {
  const names = new Set(objects.map((o) => `${o.kind}/${o.metadata.name}`));
  // The CA ConfigMap has one name in several namespaces; within a namespace names are unique.
  const placed = new Set(
    objects.map((o) => `${o.kind}/${o.metadata.namespace ?? ''}/${o.metadata.name}`),
  );
  expect(placed.size, 'two objects of one kind share a name and namespace').toBe(objects.length);
  const workloads = [
    ...findAll(objects, 'Deployment'),
    ...findAll(objects, 'StatefulSet'),
  ] as Workload[];
  for (const workload of workloads) {
    const { selector, template } = workload.spec;
    for (const [k, v] of Object.entries(selector.matchLabels))
      expect(template.metadata.labels[k], `${workload.metadata.name} selector ${k}`).toBe(v);
    const pod = template.spec;
    const volumes = new Set(
      [
        ...(pod.volumes ?? []),
        ...(workload.spec.volumeClaimTemplates ?? []).map((t) => t.metadata),
      ].map((v) => v.name),
    );
    for (const c of [...(pod.initContainers ?? []), ...pod.containers]) {
      for (const mount of c.volumeMounts ?? [])
        expect(volumes, `${c.name} mounts`).toContain(mount.name);
      for (const from of c.envFrom ?? [])
        if (from.configMapRef) expect(names).toContain(`ConfigMap/${from.configMapRef.name}`);
      // Kubernetes expands $(VAR) only from variables defined earlier in the list.
      const defined = new Set<string>();
      for (const e of c.env ?? []) {
        for (const ref of (e.value ?? '').matchAll(/\$\(([A-Z0-9_]+)\)/g))
          expect(defined, `${c.name} ${e.name} uses $(${ref[1]})`).toContain(ref[1]);
        defined.add(e.name);
      }
    }
    if (workload.spec.serviceName) expect(names).toContain(`Service/${workload.spec.serviceName}`);
  }
  for (const service of findAll(objects, 'Service') as Service[]) {
    const backends = workloads.filter((w) =>
      Object.entries(service.spec.selector).every(
        ([k, v]) => w.spec.template.metadata.labels[k] === v,
      ),
    );
    expect(backends.length, `Service ${service.metadata.name} selects a workload`).toBe(1);
    const ports = podContainers(backends[0]!).flatMap((c) => c.ports ?? []);
    for (const port of service.spec.ports)
      expect(
        ports.some((p) => p.name === port.targetPort || p.containerPort === port.targetPort),
        `Service ${service.metadata.name} port ${port.name}`,
      ).toBe(true);
  }
}

export interface Mounted {
  mount: { name: string; mountPath: string; subPath?: string; readOnly?: boolean };
  volume: Volume;
  /** The path inside the volume. */
  file: string;
}

/** The mount and volume a file path of a container lands on: what the kubelet would resolve. */
export function mountedFile(pod: PodSpec, container: Container, path: string): Mounted {
  const mount = (container.volumeMounts ?? []).find((m) => path.startsWith(`${m.mountPath}/`));
  expect(mount, `${container.name}: no mount holds ${path}`).toBeDefined();
  const volume = pod.volumes?.find((v) => v.name === mount!.name);
  expect(volume, `${container.name}: no volume ${mount!.name}`).toBeDefined();
  return { mount: mount!, volume: volume!, file: path.slice(mount!.mountPath.length + 1) };
}

export type ConfigMap = K8sObject & { data: Record<string, string> };

/** The ConfigMaps of one name, by namespace. */
export function configMaps(objects: K8sObject[], name: string): Map<string, ConfigMap> {
  return new Map(
    (findAll(objects, 'ConfigMap') as ConfigMap[])
      .filter((c) => c.metadata.name === name)
      .map((c) => [c.metadata.namespace ?? '', c]),
  );
}
