/**
 * Starts the OpenTelemetry NodeSDK from the standard OTEL_* variables (service name, resource
 * attributes, trace exporter and sampler are read by the SDK itself). Loaded by register.ts only
 * once the instrumentations are in place, because the SDK's own imports load @grpc/grpc-js.
 *
 * Metric readers are built here rather than left to the SDK: it would add an OTLP reader when
 * OTEL_METRICS_EXPORTER is unset, and this process adds a pull-only reader for its own /metrics.
 * Logs stay JSON on stdout (pino, with trace ids): no OTel log exporter is started.
 */
import { OTLPMetricExporter as OtlpGrpcMetricExporter } from '@opentelemetry/exporter-metrics-otlp-grpc';
import { OTLPMetricExporter as OtlpHttpJsonMetricExporter } from '@opentelemetry/exporter-metrics-otlp-http';
import { OTLPMetricExporter as OtlpProtoMetricExporter } from '@opentelemetry/exporter-metrics-otlp-proto';
import { PrometheusExporter } from '@opentelemetry/exporter-prometheus';
import type { Instrumentation } from '@opentelemetry/instrumentation';
import {
  ConsoleMetricExporter,
  PeriodicExportingMetricReader,
  type MetricReader,
  type PushMetricExporter,
} from '@opentelemetry/sdk-metrics';
import { NodeSDK } from '@opentelemetry/sdk-node';
import { processLocalMetrics } from './local-metrics.js';
import { pullOnlyReader } from './metrics-endpoint.js';
import type { TelemetryRuntime } from './telemetry-runtime.js';
import type { TelemetrySettings } from './telemetry-settings.js';

export function startTelemetrySdk(
  settings: TelemetrySettings,
  instrumentations: Instrumentation[],
  env: Record<string, string | undefined> = process.env,
): TelemetryRuntime {
  const localReader = pullOnlyReader();
  const readers: MetricReader[] = [localReader];
  for (const name of settings.metricExporters) {
    if (name === 'prometheus')
      readers.push(
        new PrometheusExporter({
          ...(settings.prometheus.host ? { host: settings.prometheus.host } : {}),
          port: settings.prometheus.port,
          metricProducers: [processLocalMetrics],
        }),
      );
    else
      readers.push(
        new PeriodicExportingMetricReader({
          exporter: name === 'console' ? new ConsoleMetricExporter() : otlpMetricExporter(env),
          exportIntervalMillis: settings.metricExportIntervalMs,
          exportTimeoutMillis: Math.min(30_000, settings.metricExportIntervalMs),
          metricProducers: [processLocalMetrics],
        }),
      );
  }
  const sdk = new NodeSDK({ instrumentations, metricReaders: readers, logRecordProcessors: [] });
  sdk.start();
  return { settings, localReader, shutdown: () => sdk.shutdown() };
}

function otlpMetricExporter(env: Record<string, string | undefined>): PushMetricExporter {
  const protocol = (
    env.OTEL_EXPORTER_OTLP_METRICS_PROTOCOL ??
    env.OTEL_EXPORTER_OTLP_PROTOCOL ??
    'http/protobuf'
  ).trim();
  if (protocol === 'grpc') return new OtlpGrpcMetricExporter();
  if (protocol === 'http/json') return new OtlpHttpJsonMetricExporter();
  return new OtlpProtoMetricExporter();
}
