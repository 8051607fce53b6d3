import { PrometheusSerializer } from '@opentelemetry/exporter-prometheus';
import { MeterProvider } from '@opentelemetry/sdk-metrics';
import { describe, expect, it } from 'vitest';
import { LocalMetrics } from '../../shared/telemetry/local-metrics.js';
import { pullOnlyReader } from '../../shared/telemetry/metrics-endpoint.js';

const serializer = new PrometheusSerializer('', false, undefined, true, true);
const BOUNDARIES = [0.001, 0.01, 0.1, 1];
// Boundaries themselves, values between, below the first and past the last.
const VALUES = [0, 0.0005, 0.001, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1, 1.5, 30];

/** The text of a histogram and a labelled counter, both fed VALUES. */
async function exposition(local: boolean): Promise<string[]> {
  const producer = new LocalMetrics();
  const reader = pullOnlyReader(producer);
  const provider = new MeterProvider({ readers: [reader] });
  if (local) {
    const scope = producer.scope('test');
    const histogram = scope.histogram(
      { name: 'tb_test_seconds', description: 'A test histogram.', unit: 's' },
      BOUNDARIES,
    );
    const counter = scope.counter<string>(
      { name: 'tb_test_reads', description: 'Reads.' },
      'code',
      [],
    );
    for (const value of VALUES) {
      histogram.record(value);
      counter.add(value < 1 ? 'OK' : 'SLOW');
    }
  } else {
    const meter = provider.getMeter('test');
    const histogram = meter.createHistogram('tb_test_seconds', {
      description: 'A test histogram.',
      unit: 's',
      advice: { explicitBucketBoundaries: BOUNDARIES },
    });
    const counter = meter.createCounter('tb_test_reads', { description: 'Reads.' });
    for (const value of VALUES) {
      histogram.record(value);
      counter.add(1, { code: value < 1 ? 'OK' : 'SLOW' });
    }
  }
  const { resourceMetrics } = await reader.collect();
  await provider.shutdown();
  return serializer
    .serialize(resourceMetrics)
    .split('\n')
    .filter((line) => line !== '')
    .sort();
}

describe('local instruments', () => {
  it('export exactly what the SDK instruments export for the same records', async () => {
    const sdk = await exposition(false);
    const local = await exposition(true);
    expect(local).toEqual(sdk);
    expect(local).toContain('tb_test_seconds_bucket{le="0.001"} 4');
    expect(local).toContain('tb_test_seconds_bucket{le="+Inf"} 12');
    expect(local).toContain('tb_test_reads_total{code="SLOW"} 3');
  });

  it('return the same instrument for a name, and show initial series at 0', async () => {
    const producer = new LocalMetrics();
    const scope = producer.scope('test');
    const a = scope.counter({ name: 'tb_x', description: 'x' }, 'outcome', ['ok', 'error']);
    const b = scope.counter({ name: 'tb_x', description: 'x' }, 'outcome', ['ok', 'error']);
    expect(b).toBe(a);
    a.add('ok', 2);
    const { resourceMetrics } = await producer.collect();
    const [metric] = resourceMetrics.scopeMetrics[0]!.metrics;
    expect(metric!.dataPoints.map((p) => [p.attributes, p.value])).toEqual([
      [{ outcome: 'ok' }, 2],
      [{ outcome: 'error' }, 0],
    ]);
  });
});
