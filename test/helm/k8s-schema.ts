/**
 * Validates rendered Kubernetes objects as an API server would, without a cluster:
 * - kubernetes-models' compiled OpenAPI validators: types, required fields, enums, formats;
 * - unknown fields, which those validators accept: each object is walked alongside the model's
 *   TypeScript interface (the TypeScript compiler resolves it), and any key the interface lacks
 *   is reported, with its path;
 * - the name rules the OpenAPI schema does not carry (DNS labels, label syntax).
 * The ServiceMonitor CRD is checked the same way through @kubernetes-models/prometheus-operator,
 * and cert-manager's Certificate through the minimal model in cert-manager-certificate.ts.
 */
import { join } from 'node:path';
import ts from 'typescript';
import { REPO, type K8sObject } from './helm-harness.js';

interface ModelClass {
  new (data: unknown): { validate(): void };
}

/** The module of a kind's model; a kind not listed here fails validation instead of passing. */
function modelModule(apiVersion: string, kind: string): string {
  if (apiVersion === 'monitoring.coreos.com/v1')
    return `@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${kind}`;
  // Resolved from this folder, both by the generated type file and by import() below.
  if (apiVersion === 'cert-manager.io/v1' && kind === 'Certificate')
    return './cert-manager-certificate.js';
  if (apiVersion === 'cert-manager.io/v1') throw new Error(`no schema for ${apiVersion} ${kind}`);
  if (!/^([a-z0-9.]+\/)?v\d+((alpha|beta)\d+)?$/.test(apiVersion) || !/^[A-Z][A-Za-z]+$/.test(kind))
    throw new Error(`no schema for ${apiVersion} ${kind}`);
  return `kubernetes-models/${apiVersion}/${kind}`;
}

export class K8sValidator {
  private readonly checker: ts.TypeChecker;
  private readonly types = new Map<string, ts.Type>();
  private readonly program: ts.Program;

  /** `kinds`: every `apiVersion/Kind` to be validated; one TypeScript program covers them all. */
  constructor(kinds: Array<{ apiVersion: string; kind: string }>) {
    const file = join(REPO, 'test', 'helm', '__k8s-types__.ts');
    const unique = [...new Map(kinds.map((k) => [`${k.apiVersion}/${k.kind}`, k])).values()];
    const source = unique
      .map(
        ({ apiVersion, kind }, i) =>
          `import type { I${kind} as T${i} } from '${modelModule(apiVersion, kind)}';\nexport type K${i} = T${i};`,
      )
      .join('\n');
    const options: ts.CompilerOptions = {
      module: ts.ModuleKind.NodeNext,
      moduleResolution: ts.ModuleResolutionKind.NodeNext,
      target: ts.ScriptTarget.ES2023,
      strict: true,
      skipLibCheck: true,
      noEmit: true,
      types: [],
    };
    const host = ts.createCompilerHost(options);
    const getSourceFile = host.getSourceFile.bind(host);
    host.getSourceFile = (name, language, ...rest) =>
      name === file
        ? ts.createSourceFile(name, source, language)
        : getSourceFile(name, language, ...rest);
    const fileExists = host.fileExists.bind(host);
    host.fileExists = (name) => name === file || fileExists(name);
    this.program = ts.createProgram([file], options, host);
    const problems = ts
      .getPreEmitDiagnostics(this.program)
      .map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
    if (problems.length > 0) throw new Error(`model types do not resolve: ${problems.join('; ')}`);
    this.checker = this.program.getTypeChecker();
    const sourceFile = this.program.getSourceFile(file)!;
    const aliases = sourceFile.statements.filter(ts.isTypeAliasDeclaration);
    unique.forEach(({ apiVersion, kind }, i) => {
      this.types.set(`${apiVersion}/${kind}`, this.checker.getTypeAtLocation(aliases[i]!.name));
    });
  }

  /** Every problem of one object, as `Kind/name: path: message` lines; empty when valid. */
  async problems(object: K8sObject): Promise<string[]> {
    const where = `${object.kind}/${object.metadata?.name ?? '?'}`;
    const type = this.types.get(`${object.apiVersion}/${object.kind}`);
    if (!type) return [`${where}: no schema for ${object.apiVersion} ${object.kind}`];
    const out: string[] = [];

    const module = (await import(modelModule(object.apiVersion, object.kind))) as Record<
      string,
      ModelClass
    >;
    try {
      new module[object.kind]!(structuredClone(object)).validate();
    } catch (err) {
      out.push(`${where}: ${(err as Error).message.replace(/\s+/g, ' ')}`);
    }

    const unknown: string[] = [];
    this.walk(object, type, '', unknown);
    out.push(...unknown.map((path) => `${where}: unknown field ${path}`));
    out.push(...nameProblems(object).map((p) => `${where}: ${p}`));
    return out;
  }

  private walk(value: unknown, declared: ts.Type, path: string, out: string[]): void {
    if (value === null || typeof value !== 'object') return;
    let type = this.checker.getNonNullableType(declared);
    if (type.flags & (ts.TypeFlags.Any | ts.TypeFlags.Unknown)) return;
    if (type.isUnion()) {
      const candidates = type.types.filter((t) =>
        Array.isArray(value) ? this.checker.isArrayType(t) : t.flags & ts.TypeFlags.Object,
      );
      // A primitive-only union (IntOrString, Quantity) holding an object is a type error, which
      // the OpenAPI validator reports.
      if (candidates.length === 0) return;
      type = candidates[0]!;
    }
    if (Array.isArray(value)) {
      const element = this.checker.isArrayType(type)
        ? this.checker.getTypeArguments(type as ts.TypeReference)[0]
        : undefined;
      if (!element) return;
      value.forEach((item, i) => this.walk(item, element, `${path}[${i}]`, out));
      return;
    }
    const index = this.checker.getIndexTypeOfType(type, ts.IndexKind.String);
    for (const [key, item] of Object.entries(value)) {
      const property = this.checker.getPropertyOfType(type, key);
      const at = `${path}.${key}`;
      if (property) this.walk(item, this.checker.getTypeOfSymbol(property), at, out);
      else if (index) this.walk(item, index, at, out);
      else out.push(at.slice(1));
    }
  }
}

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const LABEL_NAME = /^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;

/** The API server's rules for names and labels, which OpenAPI does not express. */
function nameProblems(object: K8sObject): string[] {
  const problems: string[] = [];
  const name = object.metadata?.name ?? '';
  // Services, StatefulSets (their pods' host names) and the like need DNS labels (63).
  const needsLabel = ['Service', 'StatefulSet', 'Deployment'].includes(object.kind);
  if (
    needsLabel
      ? !DNS_LABEL.test(name) || name.length > 63
      : !DNS_SUBDOMAIN.test(name) || name.length > 253
  )
    problems.push(
      `metadata.name ${JSON.stringify(name)} is not a valid ${needsLabel ? 'DNS label' : 'DNS subdomain'}`,
    );
  const labelSets: Array<[string, unknown]> = [['metadata.labels', object.metadata?.labels]];
  const template = (object.spec as { template?: { metadata?: { labels?: unknown } } } | undefined)
    ?.template;
  if (template) labelSets.push(['spec.template.metadata.labels', template.metadata?.labels]);
  for (const [where, labels] of labelSets) {
    for (const [key, value] of Object.entries((labels ?? {}) as Record<string, unknown>)) {
      const [prefix, base] = key.includes('/') ? key.split('/', 2) : [undefined, key];
      if (
        (prefix !== undefined && !DNS_SUBDOMAIN.test(prefix)) ||
        !base ||
        base.length > 63 ||
        !LABEL_NAME.test(base)
      )
        problems.push(`${where}: bad label key ${JSON.stringify(key)}`);
      if (typeof value !== 'string' || value.length > 63 || !LABEL_VALUE.test(value))
        problems.push(`${where}: bad label value ${JSON.stringify(value)} for ${key}`);
    }
  }
  for (const container of podContainers(object)) {
    if (!DNS_LABEL.test(container.name ?? ''))
      problems.push(`container name ${JSON.stringify(container.name)} is not a DNS label`);
    for (const port of container.ports ?? [])
      if (
        port.name !== undefined &&
        (port.name.length > 15 ||
          !/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(port.name) ||
          !/[a-z]/.test(port.name))
      )
        problems.push(`port name ${JSON.stringify(port.name)} is not an IANA service name`);
  }
  return problems;
}

export interface ContainerSpec {
  name?: string;
  ports?: Array<{ name?: string; containerPort: number }>;
  [field: string]: unknown;
}

export function podContainers(object: K8sObject): ContainerSpec[] {
  const pod = (object.spec as { template?: { spec?: Record<string, unknown> } } | undefined)
    ?.template?.spec;
  if (!pod) return [];
  return [
    ...((pod.initContainers ?? []) as ContainerSpec[]),
    ...((pod.containers ?? []) as ContainerSpec[]),
  ];
}
