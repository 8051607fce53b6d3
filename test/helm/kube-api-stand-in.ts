/**
 * A stand-in for the read endpoints of a Kubernetes API server that `helm template
 * --dry-run=server` calls: discovery (so helm can map every kind it rendered) and GET of one
 * object (the charts' `lookup`). It shows what an upgrade renders when objects already exist, which
 * `helm template` alone cannot (its lookup finds nothing), without a cluster. Plain HTTP on
 * 127.0.0.1, port 0; any other request is a 404.
 */
import { createServer, type Server } from 'node:http';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { K8sObject } from './helm-harness.js';

/** Every kind the charts render: [group/version, kind, plural, namespaced]. */
const RESOURCES: Array<[string, string, string, boolean]> = [
  ['v1', 'ConfigMap', 'configmaps', true],
  ['v1', 'Secret', 'secrets', true],
  ['v1', 'Service', 'services', true],
  ['v1', 'ServiceAccount', 'serviceaccounts', true],
  ['apps/v1', 'Deployment', 'deployments', true],
  ['apps/v1', 'StatefulSet', 'statefulsets', true],
  ['policy/v1', 'PodDisruptionBudget', 'poddisruptionbudgets', true],
  ['autoscaling/v2', 'HorizontalPodAutoscaler', 'horizontalpodautoscalers', true],
  ['networking.k8s.io/v1', 'NetworkPolicy', 'networkpolicies', true],
  ['rbac.authorization.k8s.io/v1', 'ClusterRoleBinding', 'clusterrolebindings', false],
  ['monitoring.coreos.com/v1', 'ServiceMonitor', 'servicemonitors', true],
  ['cert-manager.io/v1', 'Certificate', 'certificates', true],
];

export class KubeApiStandIn {
  readonly requests: string[] = [];
  private readonly objects = new Map<string, K8sObject>();

  private constructor(
    private readonly server: Server,
    private readonly dir: string,
    readonly kubeconfig: string,
  ) {}

  /** `objects` exist as if release `release` in `namespace` had installed them. */
  static async start(
    objects: K8sObject[],
    release = 'token-broker',
    namespace = 'token-broker',
  ): Promise<KubeApiStandIn> {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as { port: number };
    const dir = mkdtempSync(join(tmpdir(), 'tb-kube-api-'));
    const kubeconfig = join(dir, 'kubeconfig');
    writeFileSync(
      kubeconfig,
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [{ name: 'stand-in', cluster: { server: `http://127.0.0.1:${port}` } }],
        users: [{ name: 'stand-in', user: {} }],
        contexts: [{ name: 'stand-in', context: { cluster: 'stand-in', user: 'stand-in' } }],
        'current-context': 'stand-in',
      }),
    );
    const api = new KubeApiStandIn(server, dir, kubeconfig);
    for (const object of objects) {
      // Helm adopts an existing object only when its ownership metadata names this release.
      const owned = structuredClone(object);
      owned.metadata.namespace ??= namespace;
      owned.metadata.labels = { ...owned.metadata.labels, 'app.kubernetes.io/managed-by': 'Helm' };
      const meta = owned.metadata as { annotations?: Record<string, string> };
      meta.annotations = {
        ...meta.annotations,
        'meta.helm.sh/release-name': release,
        'meta.helm.sh/release-namespace': namespace,
      };
      const [, , plural] = RESOURCES.find(([, kind]) => kind === object.kind)!;
      api.objects.set(`${plural}/${owned.metadata.namespace}/${owned.metadata.name}`, owned);
    }
    server.on('request', (req, res) => {
      const path = (req.url ?? '').split('?')[0]!;
      api.requests.push(`${req.method} ${path}`);
      const body = req.method === 'GET' ? api.answer(path) : undefined;
      res.writeHead(body ? 200 : 404, { 'content-type': 'application/json' });
      res.end(
        JSON.stringify(
          body ?? { kind: 'Status', apiVersion: 'v1', status: 'Failure', reason: 'NotFound' },
        ),
      );
    });
    return api;
  }

  private answer(path: string): unknown {
    if (path === '/version') return { major: '1', minor: '31', gitVersion: 'v1.31.0' };
    if (path === '/api') return { kind: 'APIVersions', versions: ['v1'] };
    const groupVersions = [...new Set(RESOURCES.map(([gv]) => gv))].filter((gv) => gv !== 'v1');
    if (path === '/apis')
      return {
        kind: 'APIGroupList',
        apiVersion: 'v1',
        groups: groupVersions.map((gv) => {
          const [name, version] = gv.split('/') as [string, string];
          const preferred = { groupVersion: gv, version };
          return { name, versions: [preferred], preferredVersion: preferred };
        }),
      };
    for (const gv of ['v1', ...groupVersions]) {
      const base = gv === 'v1' ? '/api/v1' : `/apis/${gv}`;
      if (path === base)
        return {
          kind: 'APIResourceList',
          apiVersion: 'v1',
          groupVersion: gv,
          resources: RESOURCES.filter(([g]) => g === gv).map(([, kind, name, namespaced]) => ({
            name,
            singularName: kind.toLowerCase(),
            namespaced,
            kind,
            verbs: ['get', 'list'],
          })),
        };
      const one = new RegExp(`^${base}/namespaces/([^/]+)/([^/]+)/([^/]+)$`).exec(path);
      if (one) return this.objects.get(`${one[2]}/${one[1]}/${one[3]}`);
    }
    return undefined;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.dir, { recursive: true, force: true });
  }
}
