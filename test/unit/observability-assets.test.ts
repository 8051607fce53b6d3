/**
 * deploy/observability: the Prometheus alert rules parse as a rule file with the alerts the issue
 * asks for, the Grafana dashboard parses, and both name only metrics that the broker and the
 * sidecar really expose (the names are taken from their instruments' Prometheus exposition).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { BrokerMetrics, FAMILY_END_HORIZONS } from '../../broker/broker-metrics.js';
import { openMetricsEndpoint } from '../../shared/telemetry/metrics-endpoint.js';
import { OtelSidecarMetrics } from '../../sidecar/metrics.js';

const DIR = fileURLToPath(new URL('../../deploy/observability/', import.meta.url));

interface Rule {
  alert?: unknown;
  expr?: unknown;
  for?: unknown;
  labels?: Record<string, unknown>;
  annotations?: Record<string, unknown>;
}
interface Panel {
  id: number;
  type: string;
  title: string;
  targets?: { refId: string; expr: string }[];
}

/** Every series name the two processes expose, histogram and counter suffixes included. */
let exposed: Set<string>;

beforeAll(async () => {
  const broker = openMetricsEndpoint('broker');
  const metrics = new BrokerMetrics(broker.meter);
  metrics.observe({
    sessionCounts: () => Promise.resolve({ active: 1, reauthRequired: 0 }),
    watchers: () => 1,
    familyEnding: () => Promise.resolve([0, 1, 2]),
  });
  metrics.rotation('rotated');
  metrics.idpCall('refresh', 'ok', 120);
  metrics.lockWait(3);
  metrics.dueLag(40);
  metrics.introspectionUnusable('default', false);
  const sidecar = openMetricsEndpoint('sidecar');
  const sidecarMetrics = new OtelSidecarMetrics(sidecar, {
    streamUp: () => true,
    streamsUp: () => 2,
    watchedUsers: () => 1,
    freshUsers: () => 1,
    reauthRequiredUsers: () => 0,
  });
  sidecarMetrics.tokenRead('OK', 0.001);
  sidecarMetrics.tokenServed(1, 100);
  exposed = new Set();
  for (const endpoint of [broker, sidecar]) {
    const { body } = await endpoint.exposition();
    for (const line of body.split('\n'))
      if (line && !line.startsWith('#')) exposed.add(line.split(/[{ ]/)[0]!);
    await endpoint.shutdown();
  }
});

/** The tb_* metric names a PromQL expression reads. */
function metricNames(expr: string): string[] {
  return [...expr.matchAll(/\b(tb_[a-z0-9_]+)/g)].map((m) => m[1]!);
}

function balanced(expr: string): boolean {
  const open: string[] = [];
  const pairs: Record<string, string> = { ')': '(', ']': '[', '}': '{' };
  for (const c of expr.replace(/"(?:[^"\\]|\\.)*"/g, '""')) {
    if ('([{'.includes(c)) open.push(c);
    else if (c in pairs && open.pop() !== pairs[c]) return false;
  }
  return open.length === 0;
}

describe('deploy/observability/prometheus-rules.yaml', () => {
  const file = parse(readFileSync(join(DIR, 'prometheus-rules.yaml'), 'utf8')) as {
    groups?: { name?: unknown; rules?: Rule[] }[];
  };
  const rules = (file.groups ?? []).flatMap((g) => g.rules ?? []);

  it('is a rule file: groups with names and alerting rules', () => {
    expect(Array.isArray(file.groups) && file.groups.length > 0).toBe(true);
    for (const group of file.groups!) {
      expect(typeof group.name).toBe('string');
      expect(Array.isArray(group.rules) && group.rules.length > 0).toBe(true);
    }
    for (const rule of rules) {
      expect(Object.keys(rule).sort()).toEqual(
        expect.arrayContaining(['alert', 'annotations', 'expr', 'labels']),
      );
      for (const key of Object.keys(rule))
        expect(['alert', 'expr', 'for', 'labels', 'annotations']).toContain(key);
      expect(rule.alert).toMatch(/^[A-Z][A-Za-z0-9]+$/);
      expect(typeof rule.expr).toBe('string');
      expect(balanced(rule.expr as string), String(rule.alert)).toBe(true);
      if (rule.for !== undefined) expect(rule.for).toMatch(/^\d+[smh]$/);
      expect(['warning', 'critical']).toContain(rule.labels?.severity);
      expect(typeof rule.annotations?.summary).toBe('string');
      expect(typeof rule.annotations?.description).toBe('string');
    }
    expect(new Set(rules.map((r) => r.alert)).size).toBe(rules.length);
  });

  it('alerts on reuse suspicion, rising REAUTH, due-queue lag and near-expiry tokens', () => {
    const byMetric = (metric: string) =>
      rules.filter((r) => metricNames(r.expr as string).some((n) => n.startsWith(metric)));
    expect(byMetric('tb_broker_reuse_suspicions_total')[0]?.expr).toMatch(/> 0$/);
    expect(byMetric('tb_broker_sessions_reauth_required')).toHaveLength(1);
    expect(byMetric('tb_broker_due_lag_seconds')).toHaveLength(1);
    expect(byMetric('tb_sidecar_token_remaining_seconds')).toHaveLength(1);
    // Issue 12: a family about to end, read at one of the horizons the gauge really reports.
    const ending = byMetric('tb_broker_sessions_family_ending');
    expect(ending).toHaveLength(1);
    const within = /within="([^"]+)"/.exec(ending[0]!.expr as string)?.[1];
    expect(FAMILY_END_HORIZONS.map((h) => h.within)).toContain(within);
  });

  it('reads only metrics that exist', () => {
    for (const rule of rules) {
      const names = metricNames(rule.expr as string);
      expect(names.length, String(rule.alert)).toBeGreaterThan(0);
      for (const name of names) expect(exposed, `${String(rule.alert)}: ${name}`).toContain(name);
    }
  });
});

describe('deploy/observability/grafana-dashboard.json', () => {
  const dashboard = JSON.parse(readFileSync(join(DIR, 'grafana-dashboard.json'), 'utf8')) as {
    uid?: unknown;
    title?: unknown;
    schemaVersion?: unknown;
    panels?: Panel[];
  };
  const panels = dashboard.panels ?? [];
  const targets = panels.flatMap((p) => p.targets ?? []);

  it('is a dashboard with uniquely numbered panels, each graph with queries', () => {
    expect(dashboard.uid).toBe('token-broker');
    expect(typeof dashboard.title).toBe('string');
    expect(typeof dashboard.schemaVersion).toBe('number');
    expect(new Set(panels.map((p) => p.id)).size).toBe(panels.length);
    for (const panel of panels.filter((p) => p.type !== 'row')) {
      expect(panel.targets?.length, panel.title).toBeGreaterThan(0);
      for (const target of panel.targets!) expect(balanced(target.expr), target.expr).toBe(true);
    }
  });

  it('reads only metrics that exist, and shows every one of them', () => {
    const used = new Set(targets.flatMap((t) => metricNames(t.expr)));
    for (const name of used) expect(exposed).toContain(name);
    const families = (names: Iterable<string>) =>
      new Set([...names].map((n) => n.replace(/_(bucket|sum|count)$/, '')));
    expect([...families(exposed)].filter((f) => !families(used).has(f))).toEqual([]);
  });
});
