/**
 * Runs the real helm binary from .tools/ (scripts/fetch-helm.sh puts it there) on a copy of
 * deploy/helm in a temporary folder, so nothing is written into the repository, and parses what it
 * renders.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';

export const REPO = join(import.meta.dirname, '..', '..');
export const VALUES = join(REPO, 'test', 'helm', 'values');
const HELM = join(REPO, '.tools', 'helm');

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  [field: string]: unknown;
}

export interface HelmResult {
  ok: boolean;
  stdout: string;
  stderr: string;
}

export class HelmCharts {
  readonly root: string;
  readonly broker: string;
  readonly sidecarLibrary: string;
  readonly example: string;
  private readonly env: NodeJS.ProcessEnv;

  private constructor(root: string) {
    this.root = root;
    this.broker = join(root, 'helm', 'token-broker');
    this.sidecarLibrary = join(root, 'helm', 'token-broker-sidecar');
    this.example = join(root, 'helm', 'examples', 'module-app');
    this.env = {
      ...process.env,
      HELM_CACHE_HOME: join(root, 'home', 'cache'),
      HELM_CONFIG_HOME: join(root, 'home', 'config'),
      HELM_DATA_HOME: join(root, 'home', 'data'),
    };
  }

  /** Fetches helm if needed (idempotent, instant when present), copies the charts, vendors the
   * example's library dependency with `helm dependency build`. */
  static setUp(): HelmCharts {
    if (!existsSync(HELM))
      execFileSync(join(REPO, 'scripts', 'fetch-helm.sh'), { stdio: 'inherit' });
    const root = mkdtempSync(join(tmpdir(), 'tb-helm-'));
    cpSync(join(REPO, 'deploy', 'helm'), join(root, 'helm'), { recursive: true });
    const charts = new HelmCharts(root);
    const built = charts.run(['dependency', 'build', charts.example]);
    if (!built.ok) throw new Error(`helm dependency build failed: ${built.stderr}`);
    return charts;
  }

  tearDown(): void {
    rmSync(this.root, { recursive: true, force: true });
  }

  run(args: string[]): HelmResult {
    const result = spawnSync(HELM, args, { env: this.env, encoding: 'utf8', timeout: 60_000 });
    if (result.error) throw result.error;
    return { ok: result.status === 0, stdout: result.stdout, stderr: result.stderr };
  }

  /** Like run(), without blocking this process: for helm talking to a server the test runs.
   * `env`: more variables for this run (KUBECONFIG). */
  runAsync(args: string[], env: NodeJS.ProcessEnv = {}): Promise<HelmResult> {
    return new Promise((resolve, reject) => {
      const child = spawn(HELM, args, { env: { ...this.env, ...env }, timeout: 60_000 });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
      child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
      child.on('error', reject);
      child.on('close', (code) => resolve({ ok: code === 0, stdout, stderr }));
    });
  }

  /** `helm template` as release `token-broker` in namespace `token-broker`. */
  template(chart: string, valuesFiles: string[] = [], extra: string[] = []): HelmResult {
    return this.run([
      'template',
      'token-broker',
      chart,
      '--namespace',
      'token-broker',
      ...valuesFiles.flatMap((file) => ['-f', join(VALUES, file)]),
      ...extra,
    ]);
  }

  /** NOTES.txt as `helm install --dry-run=client` prints it (no cluster is contacted). */
  notes(chart: string, valuesFiles: string[] = []): string {
    const result = this.run([
      'install',
      'token-broker',
      chart,
      '--namespace',
      'token-broker',
      '--dry-run=client',
      ...valuesFiles.flatMap((file) => ['-f', join(VALUES, file)]),
    ]);
    if (!result.ok) throw new Error(`helm install --dry-run failed:\n${result.stderr}`);
    const notes = result.stdout.split('\nNOTES:\n')[1];
    if (notes === undefined) throw new Error('helm printed no NOTES');
    return notes;
  }

  /** Renders and parses; fails on a helm error or on YAML that a strict parser refuses. */
  render(chart: string, valuesFiles: string[] = [], extra: string[] = []): K8sObject[] {
    const result = this.template(chart, valuesFiles, extra);
    if (!result.ok) throw new Error(`helm template failed:\n${result.stderr}`);
    return parseManifests(result.stdout);
  }
}

/** Parsed as YAML 1.1, as Kubernetes (go-yaml) reads manifests: 0440 is octal, `on` is true. */
export function parseManifests(text: string): K8sObject[] {
  const objects: K8sObject[] = [];
  for (const doc of parseAllDocuments(text, { version: '1.1', uniqueKeys: true, strict: true })) {
    if (doc.errors.length > 0) throw new Error(`bad YAML: ${doc.errors.map(String).join('; ')}`);
    const value: unknown = doc.toJS();
    if (value === null || value === undefined) continue;
    objects.push(value as K8sObject);
  }
  return objects;
}

export function find(objects: K8sObject[], kind: string, name?: string): K8sObject {
  const found = objects.filter(
    (o) => o.kind === kind && (name === undefined || o.metadata.name === name),
  );
  if (found.length !== 1)
    throw new Error(`expected one ${kind}${name ? ` ${name}` : ''}, found ${found.length}`);
  return found[0]!;
}

export function findAll(objects: K8sObject[], kind: string): K8sObject[] {
  return objects.filter((o) => o.kind === kind);
}
