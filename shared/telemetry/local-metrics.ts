/**
 * Instruments for the hottest path (the sidecar's token reads): plain numbers updated in place,
 * handed to each metric reader at collection as a MetricProducer, so /metrics, the Prometheus
 * exporter and OTLP show them beside the SDK's own instruments. A record here is a few array
 * writes; through the SDK it hashes the attributes and updates every reader's storage (about
 * 3.5 us each, four per read: bench/sidecar-throughput.ts measured the difference).
 *
 * What they give up: they are always cumulative (a reader asking for delta temporality gets
 * cumulative points from them), take no views, and carry at most one label, of values known
 * when the instrument is made. The metrics they export are the same as the SDK's instruments
 * would export: histogram buckets are (previous boundary, boundary], as OpenTelemetry's.
 */
import { ValueType, type Attributes, type HrTime } from '@opentelemetry/api';
import { millisToHrTime } from '@opentelemetry/core';
import { emptyResource } from '@opentelemetry/resources';
import {
  AggregationTemporality,
  DataPointType,
  type CollectionResult,
  type MetricData,
  type MetricProducer,
} from '@opentelemetry/sdk-metrics';

interface Described {
  name: string;
  description: string;
  unit?: string;
}

export class LocalHistogram {
  private readonly counts: Float64Array;
  private sum = 0;
  private count = 0;
  private min = Infinity;
  private max = -Infinity;

  constructor(
    readonly descriptor: Described,
    readonly boundaries: readonly number[],
    private readonly startTime: HrTime,
  ) {
    this.counts = new Float64Array(boundaries.length + 1);
  }

  record(value: number): void {
    const boundaries = this.boundaries;
    let i = 0;
    while (i < boundaries.length && value > boundaries[i]!) i++;
    this.counts[i]! += 1;
    this.sum += value;
    this.count += 1;
    if (value < this.min) this.min = value;
    if (value > this.max) this.max = value;
  }

  data(endTime: HrTime): MetricData {
    return {
      descriptor: { unit: '', ...this.descriptor, valueType: ValueType.DOUBLE },
      aggregationTemporality: AggregationTemporality.CUMULATIVE,
      dataPointType: DataPointType.HISTOGRAM,
      dataPoints: [
        {
          startTime: this.startTime,
          endTime,
          attributes: {},
          value: {
            buckets: { boundaries: [...this.boundaries], counts: [...this.counts] },
            sum: this.sum,
            count: this.count,
            ...(this.count > 0 ? { min: this.min, max: this.max } : {}),
          },
        },
      ],
    };
  }
}

/** A monotonic counter with one label; each value of it is a series, shown from 0. */
export class LocalCounter<Value extends string> {
  private readonly values = new Map<string, { attributes: Attributes; total: number }>();

  constructor(
    readonly descriptor: Described,
    private readonly label: string,
    initial: readonly Value[],
    private readonly startTime: HrTime,
  ) {
    for (const value of initial) this.series(value);
  }

  add(value: Value, amount = 1): void {
    (this.values.get(value) ?? this.series(value)).total += amount;
  }

  private series(value: string) {
    const series = { attributes: { [this.label]: value }, total: 0 };
    this.values.set(value, series);
    return series;
  }

  data(endTime: HrTime): MetricData {
    return {
      descriptor: { unit: '', ...this.descriptor, valueType: ValueType.INT },
      aggregationTemporality: AggregationTemporality.CUMULATIVE,
      dataPointType: DataPointType.SUM,
      isMonotonic: true,
      dataPoints: [...this.values.values()].map(({ attributes, total }) => ({
        startTime: this.startTime,
        endTime,
        attributes,
        value: total,
      })),
    };
  }
}

type Instrument = LocalHistogram | LocalCounter<string>;

/**
 * The local instruments of one scope. Asking twice for a name returns the same instrument (as a
 * meter does), so two sidecars in one test process share them as they share SDK instruments.
 */
export class LocalScope {
  readonly instruments = new Map<string, Instrument>();

  constructor(readonly name: string) {}

  histogram(descriptor: Described, boundaries: readonly number[]): LocalHistogram {
    const existing = this.instruments.get(descriptor.name);
    if (existing instanceof LocalHistogram) return existing;
    const histogram = new LocalHistogram(descriptor, boundaries, millisToHrTime(Date.now()));
    this.instruments.set(descriptor.name, histogram);
    return histogram;
  }

  counter<Value extends string>(
    descriptor: Described,
    label: string,
    initial: readonly Value[],
  ): LocalCounter<Value> {
    const existing = this.instruments.get(descriptor.name);
    if (existing instanceof LocalCounter) return existing;
    const counter = new LocalCounter<Value>(descriptor, label, initial, millisToHrTime(Date.now()));
    this.instruments.set(descriptor.name, counter);
    return counter;
  }
}

/** Local instruments by scope, read by a metric reader as one more MetricProducer. */
export class LocalMetrics implements MetricProducer {
  private readonly scopes = new Map<string, LocalScope>();

  scope(name: string): LocalScope {
    let scope = this.scopes.get(name);
    if (!scope) this.scopes.set(name, (scope = new LocalScope(name)));
    return scope;
  }

  collect(): Promise<CollectionResult> {
    const endTime = millisToHrTime(Date.now());
    return Promise.resolve({
      // The reader keeps its own resource; this one is not read.
      resourceMetrics: {
        resource: emptyResource(),
        scopeMetrics: [...this.scopes.values()]
          .filter((scope) => scope.instruments.size > 0)
          .map((scope) => ({
            scope: { name: scope.name },
            metrics: [...scope.instruments.values()].map((i) => i.data(endTime)),
          })),
      },
      errors: [],
    });
  }
}

const KEY = Symbol.for('token-broker.local-metrics');
type Holder = { [KEY]?: LocalMetrics };

/**
 * The process's local instruments when the SDK runs: telemetry-sdk.ts gives every reader it
 * builds this producer. Without the SDK, each metrics endpoint has its own (metrics-endpoint.ts).
 * Kept on globalThis, as telemetry-runtime.ts keeps the SDK: the --import entry loads this module
 * from dist/shared/, while a bundled entry point (scripts/bundle.ts) carries a copy of its own.
 */
export const processLocalMetrics: LocalMetrics = ((globalThis as Holder)[KEY] ??=
  new LocalMetrics());
