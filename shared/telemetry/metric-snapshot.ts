/**
 * A private meter whose instruments can be read back in process: tests and the demo count
 * rotations, retries or IdP calls from the same OpenTelemetry instruments operators scrape,
 * instead of from a second set of counters kept beside them.
 */
import type { Attributes, Meter } from '@opentelemetry/api';
import { DataPointType, MeterProvider } from '@opentelemetry/sdk-metrics';
import { pullOnlyReader } from './metrics-endpoint.js';

export class MetricSnapshot {
  private readonly reader = pullOnlyReader();
  private readonly provider = new MeterProvider({ readers: [this.reader] });
  readonly meter: Meter;

  constructor(scope = 'token-broker') {
    this.meter = this.provider.getMeter(scope);
  }

  /**
   * The sum of a counter's points whose attributes include `attributes`; for a histogram, the
   * number of recorded values. 0 when nothing matches.
   */
  async value(name: string, attributes: Attributes = {}): Promise<number> {
    const { resourceMetrics } = await this.reader.collect();
    let total = 0;
    for (const scope of resourceMetrics.scopeMetrics)
      for (const metric of scope.metrics) {
        if (metric.descriptor.name !== name) continue;
        for (const point of metric.dataPoints) {
          if (!Object.entries(attributes).every(([k, v]) => point.attributes[k] === v)) continue;
          total +=
            metric.dataPointType === DataPointType.HISTOGRAM
              ? (point.value as { count: number }).count
              : (point.value as number);
        }
      }
    return total;
  }

  shutdown(): Promise<void> {
    return this.provider.shutdown();
  }
}
