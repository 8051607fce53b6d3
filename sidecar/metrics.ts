/**
 * The sidecar's metrics, on OpenTelemetry instruments behind one small interface. GET /metrics
 * serves them as Prometheus text whether telemetry is on or off; with OTEL_METRICS_EXPORTER set
 * they are exported that way too (the Prometheus exporter appends `_total` to counters). No label
 * ever carries a token, a tenant or a user.
 */
import type { Counter } from '@opentelemetry/api';
import type { LocalCounter, LocalHistogram } from '../shared/telemetry/local-metrics.js';
import type { MetricsEndpoint, MetricsText } from '../shared/telemetry/metrics-endpoint.js';

export interface SidecarMetrics {
  /** A token read answered with `code` ('OK' or an error code) after `seconds`. */
  tokenRead(code: string, seconds: number): void;
  /**
   * A token was served: how long ago this sidecar received it and how long it has left, both in
   * seconds. Few seconds left at read time is the warning before a 401.
   */
  tokenServed(ageSeconds: number, remainingSeconds: number): void;
  brokerReconnect(): void;
  tokenEvent(outcome: 'applied' | 'stale' | 'unwatched'): void;
  refreshCall(outcome: 'ok' | 'error'): void;
  /** A GetToken call because a held token neared its skew with no newer generation streamed. */
  fetchCall(outcome: 'ok' | 'error'): void;
  /** Text for GET /metrics, or undefined when metrics leave another way. */
  exposition(): Promise<MetricsText | undefined>;
}

/** Values read when metrics are collected. */
export interface SidecarGauges {
  streamUp(): boolean;
  /** Watch streams that are up (each on another replica when there are several). */
  streamsUp(): number;
  watchedUsers(): number;
  freshUsers(): number;
  reauthRequiredUsers(): number;
}

const READ_BUCKETS = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30];
const AGE_BUCKETS = [1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600];
const REMAINING_BUCKETS = [5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];

/**
 * The four instruments of every token read are local ones (shared/telemetry/local-metrics.ts):
 * through the SDK they cost a sixth of a read's CPU. The rest are the SDK's.
 */
export class OtelSidecarMetrics implements SidecarMetrics {
  private readonly reads: LocalCounter<string>;
  private readonly readSeconds: LocalHistogram;
  private readonly ageSeconds: LocalHistogram;
  private readonly remainingSeconds: LocalHistogram;
  private readonly reconnects: Counter;
  private readonly events: Counter;
  private readonly refreshes: Counter;
  private readonly fetches: Counter;

  constructor(
    private readonly endpoint: MetricsEndpoint,
    gauges: SidecarGauges,
  ) {
    const meter = endpoint.meter;
    const local = endpoint.local;
    this.reads = local.counter(
      { name: 'tb_sidecar_token_reads', description: 'Token reads by answer code (OK or error).' },
      'code',
      [],
    );
    this.readSeconds = local.histogram(
      {
        name: 'tb_sidecar_token_read_duration_seconds',
        description: 'Time to answer a token read, waits included.',
        unit: 's',
      },
      READ_BUCKETS,
    );
    this.ageSeconds = local.histogram(
      {
        name: 'tb_sidecar_token_age_seconds',
        description: 'Age of each served token: time since this sidecar received it.',
        unit: 's',
      },
      AGE_BUCKETS,
    );
    this.remainingSeconds = local.histogram(
      {
        name: 'tb_sidecar_token_remaining_seconds',
        description: 'Lifetime left of each served token at read time (expires_at - now).',
        unit: 's',
      },
      REMAINING_BUCKETS,
    );
    this.reconnects = meter.createCounter('tb_sidecar_broker_reconnects', {
      description: 'Watch stream reconnect attempts.',
    });
    this.events = meter.createCounter('tb_sidecar_token_events', {
      description:
        'Session states received: applied, or dropped as not newer (stale) or for an unwatched user.',
    });
    this.refreshes = meter.createCounter('tb_sidecar_refresh_requests', {
      description: 'Refresh calls to the broker after a module reported a rejected generation.',
    });
    this.fetches = meter.createCounter('tb_sidecar_get_token_requests', {
      description:
        'GetToken calls because a held token neared its safety skew and no stream brought a newer one.',
    });
    // The series the text exporter always showed start at 0.
    this.reconnects.add(0);
    for (const outcome of ['applied', 'stale', 'unwatched']) this.events.add(0, { outcome });
    for (const outcome of ['ok', 'error']) this.refreshes.add(0, { outcome });
    for (const outcome of ['ok', 'error']) this.fetches.add(0, { outcome });
    const up = meter.createObservableGauge('tb_sidecar_broker_stream_up', {
      description: '1 while at least one Watch stream to a broker is up.',
    });
    const streams = meter.createObservableGauge('tb_sidecar_broker_streams_up', {
      description: 'Watch streams up, each on another broker replica when there are several (2).',
    });
    const watched = meter.createObservableGauge('tb_sidecar_watched_users', {
      description: 'Users this sidecar subscribes to.',
    });
    const fresh = meter.createObservableGauge('tb_sidecar_fresh_users', {
      description: 'Watched users whose token has more than the safety skew left.',
    });
    const reauth = meter.createObservableGauge('tb_sidecar_reauth_required_users', {
      description: 'Watched users whose session needs re-authentication (REAUTH_REQUIRED).',
    });
    meter.addBatchObservableCallback(
      (result) => {
        result.observe(up, gauges.streamUp() ? 1 : 0);
        result.observe(streams, gauges.streamsUp());
        result.observe(watched, gauges.watchedUsers());
        result.observe(fresh, gauges.freshUsers());
        result.observe(reauth, gauges.reauthRequiredUsers());
      },
      [up, streams, watched, fresh, reauth],
    );
  }

  tokenRead(code: string, seconds: number): void {
    this.reads.add(code);
    this.readSeconds.record(seconds);
  }

  tokenServed(ageSeconds: number, remainingSeconds: number): void {
    this.ageSeconds.record(Math.max(0, ageSeconds));
    this.remainingSeconds.record(Math.max(0, remainingSeconds));
  }

  brokerReconnect(): void {
    this.reconnects.add(1);
  }

  tokenEvent(outcome: 'applied' | 'stale' | 'unwatched'): void {
    this.events.add(1, { outcome });
  }

  refreshCall(outcome: 'ok' | 'error'): void {
    this.refreshes.add(1, { outcome });
  }

  fetchCall(outcome: 'ok' | 'error'): void {
    this.fetches.add(1, { outcome });
  }

  exposition(): Promise<MetricsText> {
    return this.endpoint.exposition();
  }
}
