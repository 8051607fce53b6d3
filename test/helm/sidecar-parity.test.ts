/**
 * One generator: the sidecar the webhook injects (webhook/sidecar-spec.ts) and the one the library
 * chart renders are the same objects for the same tokenBroker settings, in every layout the
 * example chart's values files give, plus the Unix socket mode and telemetry. And the socket
 * mode's exec probes really ask a running sidecar on its socket.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { loadSidecarConfig } from '../../sidecar/config.js';
import { devIdentity } from '../../scripts/dev/dev-identity.js';
import { startSidecarProcess } from '../../scripts/dev/sidecar-process.js';
import { telemetrySettings } from '../../shared/telemetry/telemetry-settings.js';
import { mergeSettings } from '../../webhook/sidecar-settings.js';
import {
  moduleEnv,
  moduleVolumeMounts,
  sidecarContainer,
  sidecarVolumes,
} from '../../webhook/sidecar-spec.js';
import { find, HelmCharts, REPO, VALUES } from './helm-harness.js';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
interface Container {
  name: string;
  env?: Array<{ name: string; value?: string }>;
  volumeMounts?: Array<{ name: string }>;
  [field: string]: unknown;
}
interface PodTemplate {
  metadata: { labels: Record<string, string> };
  spec: { initContainers?: Container[]; containers: Container[]; volumes: Array<{ name: string }> };
}

const exampleValues = parse(
  readFileSync(join(REPO, 'deploy', 'helm', 'examples', 'module-app', 'values.yaml'), 'utf8'),
) as { tokenBroker: Json };

/** Helm's merge of values: maps key by key, anything else replaced. */
function merge(base: Json, over: Json): Json {
  if (!isMap(base) || !isMap(over)) return structuredClone(over);
  const out = structuredClone(base);
  for (const [k, v] of Object.entries(over)) out[k] = k in out ? merge(out[k]!, v) : v;
  return out;
}
function isMap(v: Json): v is { [key: string]: Json } {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

let charts: HelmCharts;
beforeAll(() => {
  charts = HelmCharts.setUp();
}, 120_000);
afterAll(() => charts?.tearDown());

function renderPod(file: string | undefined, tokenBroker: Json): PodTemplate {
  const extra = file ? [] : ['--set-json', `tokenBroker=${JSON.stringify(tokenBroker)}`];
  const objects = charts.render(charts.example, file ? [file] : [], extra);
  return (find(objects, 'Deployment') as unknown as { spec: { template: PodTemplate } }).spec
    .template;
}

const SOCKET_AND_TELEMETRY: Json = {
  socket: '/var/run/token-broker/socket/sidecar.sock',
  tokenDir: '/var/run/token-broker/tokens',
  telemetry: {
    enabled: true,
    endpoint: 'http://otel-collector.observability.svc:4317',
    metrics: false,
  },
};

describe('the webhook generator and the library chart', () => {
  const cases: Array<[string, string | undefined, Json]> = [
    ['the example as it ships', undefined, {}],
    ['a regular container with a token directory', 'module-container-sidecar.yaml', null],
    ['TLS options and allowed users', 'module-tls-options.yaml', null],
    ['plaintext to the broker', 'module-plaintext.yaml', null],
    ['the Unix socket mode and telemetry', undefined, SOCKET_AND_TELEMETRY],
  ];
  for (const [name, file, override] of cases)
    it(`render the same sidecar: ${name}`, () => {
      const fromFile = file
        ? (parse(readFileSync(join(VALUES, file), 'utf8')) as { tokenBroker: Json }).tokenBroker
        : override!;
      const values = merge(exampleValues.tokenBroker, fromFile);
      const pod = renderPod(file, values);
      const settings = mergeSettings(values, 'values');
      const all = [...(pod.spec.initContainers ?? []), ...pod.spec.containers];
      expect(all.find((c) => c.name === 'token-broker-sidecar')).toEqual(
        sidecarContainer(settings),
      );
      expect(pod.spec.volumes.filter((v) => v.name.startsWith('token-broker-'))).toEqual(
        sidecarVolumes(settings),
      );
      const module = pod.spec.containers.find((c) => c.name === 'module')!;
      expect(module.env).toEqual(moduleEnv(settings));
      expect(module.volumeMounts!.filter((m) => m.name.startsWith('token-broker-'))).toEqual(
        moduleVolumeMounts(settings),
      );
      expect(pod.metadata.labels).toMatchObject(settings.podLabels);
    });
});

describe('the Unix socket mode and telemetry of the library chart', () => {
  it('is accepted by the sidecar: socket, no port, OTLP export of traces only', () => {
    const pod = renderPod(undefined, merge(exampleValues.tokenBroker, SOCKET_AND_TELEMETRY));
    const sidecar = pod.spec.initContainers![0]!;
    const env = Object.fromEntries(
      sidecar.env!.filter((e) => e.value !== undefined).map((e) => [e.name, e.value!]),
    );
    expect(env.TB_SIDECAR_PORT).toBeUndefined();
    const config = loadSidecarConfig(env);
    expect(config.socketPath).toBe('/var/run/token-broker/socket/sidecar.sock');
    const telemetry = telemetrySettings(env);
    expect(telemetry).toMatchObject({
      enabled: true,
      traceExporters: ['otlp'],
      metricExporters: [],
    });
    const module = pod.spec.containers.find((c) => c.name === 'module')!;
    expect(module.env).toContainEqual({
      name: 'TOKEN_BROKER_SOCKET',
      value: '/var/run/token-broker/socket/sidecar.sock',
    });
    // The socket's directory is one volume in both containers.
    const mount = (c: Container) =>
      (c.volumeMounts as Array<{ name: string; mountPath: string }>).find(
        (m) => m.name === 'token-broker-socket',
      );
    expect(mount(sidecar)!.mountPath).toBe('/var/run/token-broker/socket');
    expect(mount(module)!.mountPath).toBe('/var/run/token-broker/socket');
  });

  it('refuses a relative socket path, a socket in tokenDir, telemetry without an endpoint', () => {
    const refused = (tokenBroker: Json) =>
      charts.template(
        charts.example,
        [],
        [
          '--set-json',
          `tokenBroker=${JSON.stringify(merge(exampleValues.tokenBroker, tokenBroker))}`,
        ],
      );
    expect(refused({ socket: 'sidecar.sock' }).stderr).toMatch(
      /tokenBroker\.socket must be an absolute file path/,
    );
    expect(refused({ socket: '/t/s.sock', tokenDir: '/t' }).stderr).toMatch(
      /tokenBroker\.socket must not be in tokenBroker\.tokenDir/,
    );
    expect(refused({ telemetry: { enabled: true } }).stderr).toMatch(
      /tokenBroker\.telemetry\.endpoint is required/,
    );
    expect(refused({ telemetry: { protocl: 'grpc' } }).stderr).toMatch(
      /tokenBroker\.telemetry\.protocl is not a sidecar setting/,
    );
  });

  it('has exec probes that ask the sidecar on its socket', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tb-sock-'));
    const socket = join(dir, 'sidecar.sock');
    const pod = renderPod(undefined, merge(exampleValues.tokenBroker, { socket, users: [] }));
    const container = pod.spec.initContainers![0]! as Container &
      Record<string, { exec: { command: string[] } }>;
    const sidecar = await startSidecarProcess({
      // No broker: /healthz answers, /readyz says not ready.
      TB_SIDECAR_BROKER_ADDRESS: '127.0.0.1:9',
      TB_SIDECAR_SOCKET: socket,
      ...devIdentity().sidecarEnv(),
    });
    const status = (probe: string) => {
      const [command, ...args] = container[probe]!.exec.command;
      expect(command).toBe('node');
      try {
        execFileSync(process.execPath, args, { stdio: 'ignore', timeout: 10_000 });
        return 0;
      } catch (err) {
        return (err as { status: number | null }).status ?? -1;
      }
    };
    try {
      expect(status('startupProbe')).toBe(0);
      expect(status('livenessProbe')).toBe(0);
      expect(status('readinessProbe')).toBe(1);
    } finally {
      expect(await sidecar.stop()).toBe(0);
    }
    expect(status('livenessProbe')).toBe(1);
  }, 60_000);
});
