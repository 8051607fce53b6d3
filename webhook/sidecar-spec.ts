/**
 * The one generator of the token-broker sidecar's pod parts: its container, its volumes, and what
 * a module container gets (env, token directory mount). The webhook builds every injected sidecar
 * here. The library chart (deploy/helm/token-broker-sidecar/templates/_sidecar.tpl) cannot run
 * TypeScript, so test/helm/sidecar-parity.test.ts renders it for the same settings and requires
 * the very same objects: a change on one side without the other fails that test.
 *
 * `SidecarSettings` is the library chart's `tokenBroker` values, key for key, and DEFAULTS are
 * its defaults (that test compares them too).
 */

import { dirname } from 'node:path/posix';

export interface SidecarSettings {
  brokerAddress: string;
  native: boolean;
  image: { repository: string; tag: string; pullPolicy: string };
  port: number;
  /** TB_SIDECAR_SOCKET: serve on this Unix socket instead of the port. */
  socket: string;
  users: string[];
  allowedUsers: string[];
  maxUsers: number | null;
  safetySkewMs: number | null;
  tokenDir: string;
  logLevel: string;
  env: Record<string, string>;
  runAsUser: number;
  resources: Resources;
  podLabels: Record<string, string>;
  serviceAccountToken: { audience: string; expirationSeconds: number };
  tls: { enabled: boolean; caConfigMap: string; serverName: string };
  telemetry: {
    enabled: boolean;
    endpoint: string;
    protocol: string;
    serviceName: string;
    traces: boolean;
    metrics: boolean;
    sampler: string;
    samplerArg: string;
  };
}

export interface Resources {
  requests?: Record<string, string>;
  limits?: Record<string, string>;
}

export const DEFAULTS: SidecarSettings = {
  brokerAddress: '',
  native: true,
  image: { repository: 'token-broker/sidecar', tag: '0.1.0', pullPolicy: 'IfNotPresent' },
  port: 8181,
  socket: '',
  users: [],
  allowedUsers: [],
  maxUsers: null,
  safetySkewMs: null,
  tokenDir: '',
  logLevel: 'info',
  env: {},
  runAsUser: 1000,
  resources: {
    requests: { cpu: '20m', memory: '64Mi' },
    limits: { cpu: '500m', memory: '128Mi' },
  },
  podLabels: { 'token-broker.io/sidecar': 'true' },
  serviceAccountToken: { audience: 'token-broker', expirationSeconds: 3600 },
  tls: { enabled: true, caConfigMap: 'token-broker-ca', serverName: '' },
  telemetry: {
    enabled: false,
    endpoint: '',
    protocol: 'grpc',
    serviceName: 'token-broker-sidecar',
    traces: true,
    metrics: true,
    sampler: 'parentbased_traceidratio',
    samplerArg: '1.0',
  },
};

export const SIDECAR_NAME = 'token-broker-sidecar';
export const SA_TOKEN_VOLUME = 'token-broker-sa-token';
export const CA_VOLUME = 'token-broker-ca';
export const TOKENS_VOLUME = 'token-broker-tokens';
export const SOCKET_VOLUME = 'token-broker-socket';
export const TOKEN_FILE = '/var/run/secrets/tokens/token-broker';
const CA_DIR = '/var/run/token-broker/ca';

/** The variables with a settings key of their own (tokenBroker.env must not set them). */
export const CHART_SET_VARIABLES = [
  'TB_SIDECAR_BROKER_ADDRESS',
  'TB_SIDECAR_PORT',
  'TB_SIDECAR_LOG_LEVEL',
  'TB_SIDECAR_USERS',
  'TB_SIDECAR_SAFETY_SKEW_MS',
  'TB_SIDECAR_TOKEN_DIR',
  'TB_SIDECAR_SOCKET',
  'TB_SIDECAR_ALLOWED_USERS',
  'TB_SIDECAR_MAX_USERS',
  'TB_SIDECAR_BROKER_TLS',
  'TB_SIDECAR_BROKER_CA_FILE',
  'TB_SIDECAR_BROKER_SERVER_NAME',
  'TB_SIDECAR_TOKEN_FILE',
];

export interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { fieldRef: { fieldPath: string } };
}

export interface VolumeMount {
  name: string;
  mountPath: string;
  readOnly?: boolean;
}

/** The sidecar container, as the library chart's "token-broker-sidecar.container" renders it. */
export function sidecarContainer(s: SidecarSettings): Record<string, unknown> {
  const env: EnvVar[] = [
    { name: 'TB_SIDECAR_BROKER_ADDRESS', value: s.brokerAddress },
    s.socket
      ? { name: 'TB_SIDECAR_SOCKET', value: s.socket }
      : { name: 'TB_SIDECAR_PORT', value: String(s.port) },
    { name: 'TB_SIDECAR_LOG_LEVEL', value: s.logLevel },
  ];
  if (s.users.length > 0) env.push({ name: 'TB_SIDECAR_USERS', value: s.users.join(',') });
  if (s.safetySkewMs !== null)
    env.push({ name: 'TB_SIDECAR_SAFETY_SKEW_MS', value: String(s.safetySkewMs) });
  if (s.tokenDir) env.push({ name: 'TB_SIDECAR_TOKEN_DIR', value: s.tokenDir });
  if (s.allowedUsers.length > 0)
    env.push({ name: 'TB_SIDECAR_ALLOWED_USERS', value: s.allowedUsers.join(',') });
  if (s.maxUsers !== null) env.push({ name: 'TB_SIDECAR_MAX_USERS', value: String(s.maxUsers) });
  env.push({ name: 'TB_SIDECAR_TOKEN_FILE', value: TOKEN_FILE });
  if (!s.tls.enabled) env.push({ name: 'TB_SIDECAR_BROKER_TLS', value: 'off' });
  else {
    if (s.tls.caConfigMap)
      env.push({ name: 'TB_SIDECAR_BROKER_CA_FILE', value: `${CA_DIR}/ca.crt` });
    if (s.tls.serverName)
      env.push({ name: 'TB_SIDECAR_BROKER_SERVER_NAME', value: s.tls.serverName });
  }
  if (s.telemetry.enabled) env.push(...telemetryEnv(s.telemetry));
  // Helm ranges over a map in key order.
  for (const name of Object.keys(s.env).sort()) env.push({ name, value: String(s.env[name]) });

  const volumeMounts: VolumeMount[] = [
    { name: SA_TOKEN_VOLUME, mountPath: '/var/run/secrets/tokens', readOnly: true },
  ];
  if (s.tls.enabled && s.tls.caConfigMap)
    volumeMounts.push({ name: CA_VOLUME, mountPath: CA_DIR, readOnly: true });
  if (s.tokenDir) volumeMounts.push({ name: TOKENS_VOLUME, mountPath: s.tokenDir });
  if (s.socket) volumeMounts.push({ name: SOCKET_VOLUME, mountPath: dirname(s.socket) });

  return {
    name: SIDECAR_NAME,
    image: `${s.image.repository}:${s.image.tag}`,
    imagePullPolicy: s.image.pullPolicy,
    // A native sidecar: started (startupProbe passed) before the module, stopped after it.
    ...(s.native ? { restartPolicy: 'Always' } : {}),
    env,
    startupProbe: {
      ...probe(s, '/healthz'),
      periodSeconds: 1,
      timeoutSeconds: 3,
      failureThreshold: 30,
    },
    readinessProbe: { ...probe(s, '/readyz'), periodSeconds: 5, timeoutSeconds: 3 },
    livenessProbe: {
      ...probe(s, '/healthz'),
      periodSeconds: 10,
      timeoutSeconds: 3,
      failureThreshold: 3,
    },
    resources: structuredClone(s.resources),
    securityContext: {
      runAsNonRoot: true,
      runAsUser: s.runAsUser,
      allowPrivilegeEscalation: false,
      readOnlyRootFilesystem: true,
      capabilities: { drop: ['ALL'] },
      seccompProfile: { type: 'RuntimeDefault' },
    },
    volumeMounts,
  };
}

/**
 * The sidecar binds 127.0.0.1 (or a Unix socket) only and kubelet's httpGet goes to the pod IP: an
 * exec probe with the image's node; node:http for the socket, which fetch cannot dial.
 */
function probe(s: SidecarSettings, path: string): { exec: { command: string[] } } {
  const script = s.socket
    ? `require('node:http').get({ socketPath: '${s.socket}', path: '${path}', headers: { host: 'localhost' }, timeout: 2000 }, (r) => process.exit(r.statusCode === 200 ? 0 : 1)).on('timeout', () => process.exit(1)).on('error', () => process.exit(1))`
    : `fetch('http://127.0.0.1:${s.port}${path}', { signal: AbortSignal.timeout(2000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))`;
  return { exec: { command: ['node', '-e', script] } };
}

/** OTLP export of traces and metrics (Prometheus cannot scrape the sidecar's 127.0.0.1). */
function telemetryEnv(t: SidecarSettings['telemetry']): EnvVar[] {
  const field = (fieldPath: string) => ({ fieldRef: { fieldPath } });
  return [
    { name: 'OTEL_SERVICE_NAME', value: t.serviceName },
    { name: 'K8S_POD_NAME', valueFrom: field('metadata.name') },
    { name: 'K8S_NAMESPACE_NAME', valueFrom: field('metadata.namespace') },
    {
      name: 'OTEL_RESOURCE_ATTRIBUTES',
      value: 'k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME)',
    },
    { name: 'OTEL_EXPORTER_OTLP_ENDPOINT', value: t.endpoint },
    { name: 'OTEL_EXPORTER_OTLP_PROTOCOL', value: t.protocol },
    { name: 'OTEL_TRACES_EXPORTER', value: t.traces ? 'otlp' : 'none' },
    { name: 'OTEL_METRICS_EXPORTER', value: t.metrics ? 'otlp' : 'none' },
    { name: 'OTEL_TRACES_SAMPLER', value: t.sampler },
    { name: 'OTEL_TRACES_SAMPLER_ARG', value: t.samplerArg },
    { name: 'OTEL_LOGS_EXPORTER', value: 'none' },
  ];
}

/** The pod volumes the sidecar needs ("token-broker-sidecar.volumes"). */
export function sidecarVolumes(s: SidecarSettings): Record<string, unknown>[] {
  const volumes: Record<string, unknown>[] = [
    {
      name: SA_TOKEN_VOLUME,
      projected: {
        sources: [
          {
            serviceAccountToken: {
              audience: s.serviceAccountToken.audience,
              expirationSeconds: s.serviceAccountToken.expirationSeconds,
              path: 'token-broker',
            },
          },
        ],
      },
    },
  ];
  if (s.tls.enabled && s.tls.caConfigMap)
    volumes.push({
      name: CA_VOLUME,
      configMap: { name: s.tls.caConfigMap, items: [{ key: 'ca.crt', path: 'ca.crt' }] },
    });
  if (s.tokenDir)
    volumes.push({ name: TOKENS_VOLUME, emptyDir: { medium: 'Memory', sizeLimit: '1Mi' } });
  if (s.socket)
    volumes.push({ name: SOCKET_VOLUME, emptyDir: { medium: 'Memory', sizeLimit: '1Mi' } });
  return volumes;
}

/** What a module container reads ("token-broker-sidecar.moduleEnv"). */
export function moduleEnv(s: SidecarSettings): EnvVar[] {
  const env = s.socket
    ? [{ name: 'TOKEN_BROKER_SOCKET', value: s.socket }]
    : [{ name: 'TOKEN_BROKER_URL', value: `http://127.0.0.1:${s.port}` }];
  if (s.tokenDir) env.push({ name: 'TOKEN_BROKER_TOKEN_DIR', value: s.tokenDir });
  return env;
}

/** The token directory (read-only) and the socket's, for a module container ("…moduleVolumeMounts"). */
export function moduleVolumeMounts(s: SidecarSettings): VolumeMount[] {
  const mounts: VolumeMount[] = [];
  if (s.tokenDir) mounts.push({ name: TOKENS_VOLUME, mountPath: s.tokenDir, readOnly: true });
  // The socket's directory: connecting needs write access to the socket file.
  if (s.socket) mounts.push({ name: SOCKET_VOLUME, mountPath: dirname(s.socket) });
  return mounts;
}
