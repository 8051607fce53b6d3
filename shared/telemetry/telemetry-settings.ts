/**
 * Whether and how a process exports telemetry, decided once from the environment. Pure: nothing
 * here loads the OpenTelemetry SDK, so a process with telemetry off pays nothing for it.
 *
 * On when OTEL_SDK_DISABLED is not "true" and either TB_TELEMETRY=on or OTEL_TRACES_EXPORTER or
 * OTEL_METRICS_EXPORTER names an exporter other than "none". TB_TELEMETRY=off turns it off
 * whatever else is set. Off by default, so tests and the demo export nothing unless asked.
 */
export interface TelemetrySettings {
  enabled: boolean;
  /** Why it is on or off, for the start-up log line. */
  reason: string;
  /** OTEL_TRACES_EXPORTER entries (default `otlp`, as the specification says); empty: none. */
  traceExporters: TraceExporterName[];
  /**
   * OTEL_METRICS_EXPORTER entries. Unlike the specification's default (`otlp`), unset means none:
   * an OTLP metric reader nobody asked for would hold up shutdown retrying a missing collector.
   */
  metricExporters: MetricExporterName[];
  /** OTEL_EXPORTER_PROMETHEUS_HOST and _PORT (default all interfaces, 9464). */
  prometheus: { host: string | undefined; port: number };
  /** OTEL_METRIC_EXPORT_INTERVAL for pushed (OTLP, console) metrics, ms. */
  metricExportIntervalMs: number;
  /**
   * TB_TRACE_CLIENT_SPANS: which client libraries get a span per call, besides our own spans.
   * `redis`: every Redis command (the ioredis instrumentation); a rotation sends about 25, whose
   * spans cost more than the rotation's own work, and tracing them one by one turns off ioredis's
   * auto-pipelining (broker/store/auto-pipelining.ts). `http`: every outgoing HTTP request (the
   * http and undici instrumentations), about a third of a rotation's cost again. Neither by
   * default: the idp.* spans carry the IdP call's HTTP attributes and send its traceparent
   * themselves, and lock.*, broker.persist stand for the Redis work.
   */
  clientSpans: ClientSpans;
}

export interface ClientSpans {
  redis: boolean;
  http: boolean;
}

const CLIENT_SPAN_KINDS: readonly string[] = ['redis', 'http', 'none'];

export type TraceExporterName = 'otlp' | 'console' | 'zipkin';
export type MetricExporterName = 'otlp' | 'console' | 'prometheus';

const TRACE_EXPORTERS: readonly string[] = ['otlp', 'console', 'zipkin', 'none'];
const METRIC_EXPORTERS: readonly string[] = ['otlp', 'console', 'prometheus', 'none'];

/** A bad telemetry variable: the process refuses to start, naming it. */
export class TelemetrySettingError extends Error {
  constructor(
    readonly setting: string,
    message: string,
  ) {
    super(`${setting} ${message}`);
  }
}

type Env = Record<string, string | undefined>;

export function telemetrySettings(env: Env = process.env): TelemetrySettings {
  const switchValue = (env.TB_TELEMETRY ?? '').trim().toLowerCase();
  if (!['', 'on', 'off'].includes(switchValue))
    throw new TelemetrySettingError('TB_TELEMETRY', 'must be on or off');
  const traceExporters = namedList(env, 'OTEL_TRACES_EXPORTER', TRACE_EXPORTERS, [
    'otlp',
  ]) as TraceExporterName[];
  const metricExporters = namedList(
    env,
    'OTEL_METRICS_EXPORTER',
    METRIC_EXPORTERS,
    [],
  ) as MetricExporterName[];
  const clientKinds = namedList(env, 'TB_TRACE_CLIENT_SPANS', CLIENT_SPAN_KINDS, [], 'kind');
  const portText = env.OTEL_EXPORTER_PROMETHEUS_PORT?.trim() || '9464';
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port > 65_535)
    throw new TelemetrySettingError('OTEL_EXPORTER_PROMETHEUS_PORT', 'must be a port number');
  const intervalText = env.OTEL_METRIC_EXPORT_INTERVAL?.trim() || '60000';
  if (!/^\d+$/.test(intervalText) || Number(intervalText) < 1)
    throw new TelemetrySettingError('OTEL_METRIC_EXPORT_INTERVAL', 'must be a positive integer');

  let enabled: boolean;
  let reason: string;
  if ((env.OTEL_SDK_DISABLED ?? '').trim().toLowerCase() === 'true') {
    enabled = false;
    reason = 'OTEL_SDK_DISABLED=true';
  } else if (switchValue === 'off') {
    enabled = false;
    reason = 'TB_TELEMETRY=off';
  } else if (switchValue === 'on') {
    enabled = true;
    reason = 'TB_TELEMETRY=on';
  } else if (named(env.OTEL_TRACES_EXPORTER) || named(env.OTEL_METRICS_EXPORTER)) {
    enabled = true;
    reason = 'an OTEL_*_EXPORTER is set';
  } else {
    enabled = false;
    reason = 'off by default: set TB_TELEMETRY=on or OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER';
  }
  return {
    enabled,
    reason,
    traceExporters: enabled ? traceExporters : [],
    metricExporters: enabled ? metricExporters : [],
    prometheus: { host: env.OTEL_EXPORTER_PROMETHEUS_HOST?.trim() || undefined, port },
    metricExportIntervalMs: Number(intervalText),
    clientSpans: {
      redis: enabled && clientKinds.includes('redis'),
      http: enabled && clientKinds.includes('http'),
    },
  };
}

/** True when the variable names at least one exporter other than `none`. */
function named(value: string | undefined): boolean {
  return split(value).some((name) => name !== 'none');
}

function split(value: string | undefined): string[] {
  return (value ?? '')
    .split(',')
    .map((s) => s.trim().toLowerCase())
    .filter((s) => s !== '');
}

/** The comma list in `setting`, each name one of `known` (`none` empties it; `what` names them). */
function namedList(
  env: Env,
  setting: string,
  known: readonly string[],
  fallback: string[],
  what = 'exporter',
): string[] {
  const names = split(env[setting]);
  if (names.length === 0) return fallback;
  for (const name of names)
    if (!known.includes(name))
      throw new TelemetrySettingError(
        setting,
        `names an unknown ${what} ${JSON.stringify(name)} (known: ${known.join(', ')})`,
      );
  if (names.includes('none')) return [];
  return [...new Set(names)];
}
