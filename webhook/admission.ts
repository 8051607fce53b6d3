/**
 * One AdmissionReview (admission.k8s.io/v1) in, one out: a pod with token-broker.io/inject "true"
 * gets the sidecar as a native sidecar (an init container with restartPolicy Always) by JSONPatch;
 * every other pod is admitted unchanged. A pod already injected is left alone (idempotent), and
 * the broker's and the webhook's own pods never get one.
 */
import { AnnotationError } from './errors.js';
import { INJECT, readInjection, STATUS, bool } from './annotations.js';
import {
  moduleEnv,
  moduleVolumeMounts,
  SIDECAR_NAME,
  sidecarContainer,
  sidecarVolumes,
  TOKENS_VOLUME,
  type SidecarSettings,
} from './sidecar-spec.js';

export interface PatchOperation {
  op: 'add';
  path: string;
  value: unknown;
}

export interface AdmissionOptions {
  settings: SidecarSettings;
  /** The webhook's and the broker's namespace: nothing there is ever injected. */
  ownNamespace: string;
}

export type AdmissionOutcome =
  | { kind: 'skipped'; reason: string }
  | { kind: 'injected'; patch: PatchOperation[] }
  | { kind: 'refused'; message: string };

interface Container {
  name: string;
  env?: unknown[];
  volumeMounts?: unknown[];
}

interface Pod {
  metadata?: { labels?: Record<string, string>; annotations?: Record<string, string> };
  spec?: {
    containers?: Container[];
    initContainers?: Container[];
    volumes?: Array<{ name: string }>;
  };
}

/** A request the webhook cannot read (not an AdmissionReview v1): answered with HTTP 400. */
export class BadReviewError extends Error {}

/** The AdmissionReview to send back for `body`. */
export function review(
  body: unknown,
  options: AdmissionOptions,
): { response: object; outcome: AdmissionOutcome } {
  const request = (body as { request?: unknown } | null)?.request as
    { uid?: unknown; kind?: { kind?: unknown }; namespace?: unknown; object?: unknown } | undefined;
  const b = body as { apiVersion?: unknown; kind?: unknown } | null;
  if (b?.apiVersion !== 'admission.k8s.io/v1' || b.kind !== 'AdmissionReview')
    throw new BadReviewError('expected an admission.k8s.io/v1 AdmissionReview');
  if (!request || typeof request.uid !== 'string' || request.uid === '')
    throw new BadReviewError('request.uid is missing');
  const outcome =
    request.kind?.kind === 'Pod' && request.object && typeof request.object === 'object'
      ? mutatePod(
          request.object,
          typeof request.namespace === 'string' ? request.namespace : '',
          options,
        )
      : ({ kind: 'skipped', reason: 'not a pod' } as const);
  const response: Record<string, unknown> = {
    uid: request.uid,
    allowed: outcome.kind !== 'refused',
  };
  if (outcome.kind === 'injected') {
    response.patchType = 'JSONPatch';
    response.patch = Buffer.from(JSON.stringify(outcome.patch)).toString('base64');
  }
  if (outcome.kind === 'refused')
    response.status = { code: 400, reason: 'BadRequest', message: outcome.message };
  return {
    response: { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview', response },
    outcome,
  };
}

export function mutatePod(
  pod: Pod,
  namespace: string,
  options: AdmissionOptions,
): AdmissionOutcome {
  const annotations = pod.metadata?.annotations ?? {};
  const labels = pod.metadata?.labels ?? {};
  if (namespace === options.ownNamespace)
    return { kind: 'skipped', reason: 'the broker namespace' };
  if (labels['app.kubernetes.io/part-of'] === 'token-broker')
    return { kind: 'skipped', reason: 'a token-broker pod' };
  let inject: boolean;
  try {
    inject = bool(INJECT, annotations[INJECT]?.trim(), false);
  } catch (err) {
    return { kind: 'refused', message: refusal(err) };
  }
  if (!inject) return { kind: 'skipped', reason: 'not asked for' };
  const spec = pod.spec ?? {};
  const containers = spec.containers ?? [];
  const inits = spec.initContainers ?? [];
  if (
    annotations[STATUS] === 'injected' ||
    [...inits, ...containers].some((c) => c.name === SIDECAR_NAME)
  )
    return { kind: 'skipped', reason: 'already injected' };

  let injection;
  try {
    injection = readInjection(
      annotations,
      options.settings,
      containers.map((c) => c.name),
    );
    // Every volume the injection adds (the socket's too) must be free in the pod.
    const ours = new Set(sidecarVolumes(injection.settings).map((v) => v.name));
    const taken = (spec.volumes ?? []).map((v) => v.name).find((n) => ours.has(n));
    if (taken)
      throw new AnnotationError(
        INJECT,
        `cannot inject: the pod already has a volume named ${taken}`,
      );
  } catch (err) {
    return { kind: 'refused', message: refusal(err) };
  }
  const { settings, first, tokenDirContainers } = injection;
  const patch: PatchOperation[] = [];
  const add = (path: string, value: unknown) => patch.push({ op: 'add', path, value });

  const sidecar = sidecarContainer({ ...settings, native: true });
  if (inits.length === 0) add('/spec/initContainers', [sidecar]);
  else add(first ? '/spec/initContainers/0' : '/spec/initContainers/-', sidecar);

  const volumes = sidecarVolumes(settings);
  if (!spec.volumes) add('/spec/volumes', volumes);
  else for (const volume of volumes) add('/spec/volumes/-', volume);

  containers.forEach((container, i) => {
    const present = new Set((container.env ?? []).map((e) => (e as { name?: string }).name));
    const env = moduleEnv(settings).filter((e) => !present.has(e.name));
    if (!container.env) add(`/spec/containers/${i}/env`, env);
    else for (const item of env) add(`/spec/containers/${i}/env/-`, item);
    // The socket's directory in every module container, the token directory where asked.
    const mounts = moduleVolumeMounts(settings).filter(
      (m) => m.name !== TOKENS_VOLUME || tokenDirContainers.includes(container.name),
    );
    if (mounts.length === 0) return;
    if (!container.volumeMounts) add(`/spec/containers/${i}/volumeMounts`, mounts);
    else for (const mount of mounts) add(`/spec/containers/${i}/volumeMounts/-`, mount);
  });

  if (!pod.metadata?.labels) add('/metadata/labels', { ...settings.podLabels });
  else
    for (const [k, v] of Object.entries(settings.podLabels))
      add(`/metadata/labels/${pointer(k)}`, v);
  if (!pod.metadata?.annotations) add('/metadata/annotations', { [STATUS]: 'injected' });
  else add(`/metadata/annotations/${pointer(STATUS)}`, 'injected');
  return { kind: 'injected', patch };
}

function refusal(err: unknown): string {
  if (err instanceof AnnotationError) return `token-broker sidecar injection: ${err.message}`;
  throw err;
}

/** RFC 6901: ~ and / in a key. */
function pointer(key: string): string {
  return key.replace(/~/g, '~0').replace(/\//g, '~1');
}
