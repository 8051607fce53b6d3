/**
 * A process's own Prometheus text endpoint (the sidecar's /metrics). With the SDK running, its
 * instruments live on the SDK's meter provider, so OTEL_METRICS_EXPORTER exports them too; with
 * telemetry off, a private meter provider with a pull-only reader still feeds /metrics.
 */
import { metrics, type Meter } from '@opentelemetry/api';
import { PrometheusExporter, PrometheusSerializer } from '@opentelemetry/exporter-prometheus';
import { MeterProvider, type MetricReader } from '@opentelemetry/sdk-metrics';
import { LocalMetrics, processLocalMetrics, type LocalScope } from './local-metrics.js';
import { telemetryRuntime } from './telemetry-runtime.js';

export interface MetricsText {
  contentType: string;
  body: string;
}

export interface MetricsEndpoint {
  readonly meter: Meter;
  /** Instruments for the hottest paths (local-metrics.ts), exported with the meter's. */
  readonly local: LocalScope;
  /** The current values in Prometheus text exposition format 0.0.4. */
  exposition(): Promise<MetricsText>;
  shutdown(): Promise<void>;
}

const CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
// No scope labels nor target_info on the local endpoint: the process is the target.
const serializer = new PrometheusSerializer('', false, undefined, true, true);

/** A reader that only answers collect(): no server of its own. */
export function pullOnlyReader(local: LocalMetrics = processLocalMetrics): MetricReader {
  return new PrometheusExporter({
    preventServerStart: true,
    withoutScopeInfo: true,
    withoutTargetInfo: true,
    metricProducers: [local],
  });
}

export function openMetricsEndpoint(scope: string): MetricsEndpoint {
  const runtime = telemetryRuntime();
  if (runtime)
    return {
      meter: metrics.getMeter(scope),
      local: processLocalMetrics.scope(scope),
      exposition: () => expose(runtime.localReader),
      shutdown: () => Promise.resolve(),
    };
  const local = new LocalMetrics();
  const reader = pullOnlyReader(local);
  const provider = new MeterProvider({ readers: [reader] });
  return {
    meter: provider.getMeter(scope),
    local: local.scope(scope),
    exposition: () => expose(reader),
    shutdown: () => provider.shutdown(),
  };
}

async function expose(reader: MetricReader): Promise<MetricsText> {
  const { resourceMetrics } = await reader.collect();
  return { contentType: CONTENT_TYPE, body: serializer.serialize(resourceMetrics) };
}
