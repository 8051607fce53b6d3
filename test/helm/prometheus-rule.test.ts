/**
 * metrics.prometheusRule: the shipped alert rules reach the cluster as a PrometheusRule, the same
 * rules deploy/observability/prometheus-rules.yaml holds (the chart's copy cannot drift), with
 * Prometheus' own {{ $value }} templates left for Prometheus.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { K8sValidator } from './k8s-schema.js';
import { find, findAll, HelmCharts, REPO, type K8sObject } from './helm-harness.js';

const shipped = readFileSync(
  join(REPO, 'deploy', 'observability', 'prometheus-rules.yaml'),
  'utf8',
);

let charts: HelmCharts;
beforeAll(() => {
  charts = HelmCharts.setUp();
}, 120_000);
afterAll(() => charts?.tearDown());

describe('the PrometheusRule', () => {
  it("is the chart's copy of the shipped rules, byte for byte", () => {
    const copy = readFileSync(
      join(REPO, 'deploy', 'helm', 'token-broker', 'files', 'prometheus-rules.yaml'),
      'utf8',
    );
    expect(copy).toBe(shipped);
  });

  it('renders the shipped groups, valid against the operator CRD, with the labels asked', async () => {
    const objects = charts.render(
      charts.broker,
      ['minimal.yaml'],
      [
        '--set',
        'metrics.enabled=true,metrics.prometheusRule.enabled=true,metrics.prometheusRule.labels.release=kube-prometheus',
      ],
    );
    const rule = find(objects, 'PrometheusRule') as K8sObject & { spec: { groups: unknown[] } };
    const validator = new K8sValidator([
      { apiVersion: 'monitoring.coreos.com/v1', kind: 'PrometheusRule' },
    ]);
    expect(await validator.problems(rule)).toEqual([]);
    expect(rule.spec).toEqual({ groups: (parse(shipped) as { groups: unknown[] }).groups });
    expect(JSON.stringify(rule.spec)).toContain('{{ $value }}');
    expect(rule.metadata.labels!.release).toBe('kube-prometheus');
  });

  it('is off by default, and refused without metrics.enabled', () => {
    expect(findAll(charts.render(charts.broker, ['minimal.yaml']), 'PrometheusRule')).toEqual([]);
    const refused = charts.template(
      charts.broker,
      ['minimal.yaml'],
      ['--set', 'metrics.prometheusRule.enabled=true'],
    );
    expect(refused.ok).toBe(false);
    expect(refused.stderr).toMatch(/metrics/);
  });
});
