/**
 * The sidecar accepts the environment the library chart gives it: both example variants go through
 * the sidecar's own loadSidecarConfig().
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSidecarConfig } from '../../sidecar/config.js';
import { find, HelmCharts } from './helm-harness.js';

interface Container {
  name: string;
  env: Array<{ name: string; value: string }>;
}

let charts: HelmCharts;
beforeAll(() => {
  charts = HelmCharts.setUp();
}, 120_000);
afterAll(() => charts?.tearDown());

function sidecarEnv(files: string[]): Record<string, string> {
  const pod = (
    find(charts.render(charts.example, files), 'Deployment') as unknown as {
      spec: { template: { spec: { initContainers?: Container[]; containers: Container[] } } };
    }
  ).spec.template.spec;
  const sidecar = [...(pod.initContainers ?? []), ...pod.containers].find(
    (c) => c.name === 'token-broker-sidecar',
  )!;
  return Object.fromEntries(sidecar.env.map((e) => [e.name, e.value]));
}

describe('the sidecar accepts the configuration the library chart renders', () => {
  it('as a native sidecar with prefetched users', () => {
    const config = loadSidecarConfig(sidecarEnv([]));
    expect(config.brokerAddress).toBe(
      'dns:///token-broker-headless.token-broker.svc.cluster.local:50051',
    );
    expect(config.port).toBe(8181);
    expect(config.users).toEqual([{ tenant: 'diku', user: 'data-import-system-user' }]);
  });

  it('as a container with a token directory, a skew and an extra variable', () => {
    const config = loadSidecarConfig(sidecarEnv(['module-container-sidecar.yaml']));
    expect(config.tokenDir).toBe('/var/run/token-broker/tokens');
    expect(config.safetySkewMs).toBe(20_000);
    expect(config.keepaliveMs).toBe(15_000);
  });

  it('with TLS options and allowed users, and in plaintext', () => {
    // The variables the library renders for TLS and users, which the sidecar must know.
    const options = sidecarEnv(['module-tls-options.yaml']);
    expect(Object.keys(options)).toEqual(
      expect.arrayContaining([
        'TB_SIDECAR_TOKEN_FILE',
        'TB_SIDECAR_BROKER_CA_FILE',
        'TB_SIDECAR_BROKER_SERVER_NAME',
        'TB_SIDECAR_ALLOWED_USERS',
        'TB_SIDECAR_MAX_USERS',
      ]),
    );
    expect(() => loadSidecarConfig(options)).not.toThrow();
    const plaintext = sidecarEnv(['module-plaintext.yaml']);
    expect(plaintext.TB_SIDECAR_BROKER_TLS).toBe('off');
    expect(() => loadSidecarConfig(plaintext)).not.toThrow();
  });

  it('is refused by the sidecar when tokenBroker.env names no sidecar setting', () => {
    const env = sidecarEnv([]);
    expect(() => loadSidecarConfig({ ...env, TB_SIDECAR_TYPO: '1' })).toThrow(/TB_SIDECAR_TYPO/);
  });
});
