/**
 * The sidecar's metrics, behind one small interface so another exporter (OpenTelemetry) can
 * replace the Prometheus text one without touching the callers. No label ever carries a token,
 * a tenant or a user.
 */
export interface SidecarMetrics {
  /** A token read answered with `code` ('OK' or an error code) after `seconds`. */
  tokenRead(code: string, seconds: number): void;
  brokerReconnect(): void;
  tokenEvent(outcome: 'applied' | 'stale' | 'unwatched'): void;
  refreshCall(outcome: 'ok' | 'error'): void;
  /** Text for GET /metrics, or undefined when metrics leave another way. */
  exposition(): { contentType: string; body: string } | undefined;
}

/** Values read when metrics are scraped. */
export interface SidecarGauges {
  streamUp(): boolean;
  watchedUsers(): number;
  freshUsers(): number;
}

const READ_BUCKETS = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30] as const;

/** Prometheus text exposition format 0.0.4, hand-written: a handful of counters and a histogram. */
export class PrometheusTextMetrics implements SidecarMetrics {
  private readonly reads = new Map<string, number>();
  private readonly readBuckets = new Array<number>(READ_BUCKETS.length).fill(0);
  private readSum = 0;
  private readCount = 0;
  private reconnects = 0;
  private readonly events = { applied: 0, stale: 0, unwatched: 0 };
  private readonly refreshes = { ok: 0, error: 0 };

  constructor(private readonly gauges: SidecarGauges) {}

  tokenRead(code: string, seconds: number): void {
    this.reads.set(code, (this.reads.get(code) ?? 0) + 1);
    this.readSum += seconds;
    this.readCount++;
    for (let i = 0; i < READ_BUCKETS.length; i++)
      if (seconds <= READ_BUCKETS[i]!) {
        this.readBuckets[i]!++;
        break;
      }
  }

  brokerReconnect(): void {
    this.reconnects++;
  }

  tokenEvent(outcome: 'applied' | 'stale' | 'unwatched'): void {
    this.events[outcome]++;
  }

  refreshCall(outcome: 'ok' | 'error'): void {
    this.refreshes[outcome]++;
  }

  exposition(): { contentType: string; body: string } {
    const lines: string[] = [];
    const family = (name: string, type: string, help: string) =>
      lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);

    family('tb_sidecar_token_reads_total', 'counter', 'Token reads by answer code (OK or error).');
    for (const [code, n] of this.reads)
      lines.push(`tb_sidecar_token_reads_total{code="${code}"} ${n}`);

    family(
      'tb_sidecar_token_read_duration_seconds',
      'histogram',
      'Time to answer a token read, waits included.',
    );
    let cumulative = 0;
    READ_BUCKETS.forEach((le, i) => {
      cumulative += this.readBuckets[i]!;
      lines.push(`tb_sidecar_token_read_duration_seconds_bucket{le="${le}"} ${cumulative}`);
    });
    lines.push(
      `tb_sidecar_token_read_duration_seconds_bucket{le="+Inf"} ${this.readCount}`,
      `tb_sidecar_token_read_duration_seconds_sum ${this.readSum}`,
      `tb_sidecar_token_read_duration_seconds_count ${this.readCount}`,
    );

    family('tb_sidecar_broker_stream_up', 'gauge', '1 while the Watch stream to a broker is up.');
    lines.push(`tb_sidecar_broker_stream_up ${this.gauges.streamUp() ? 1 : 0}`);
    family('tb_sidecar_broker_reconnects_total', 'counter', 'Watch stream reconnect attempts.');
    lines.push(`tb_sidecar_broker_reconnects_total ${this.reconnects}`);

    family(
      'tb_sidecar_token_events_total',
      'counter',
      'Session states received: applied, or dropped as not newer (stale) or for an unwatched user.',
    );
    for (const [outcome, n] of Object.entries(this.events))
      lines.push(`tb_sidecar_token_events_total{outcome="${outcome}"} ${n}`);

    family(
      'tb_sidecar_refresh_requests_total',
      'counter',
      'Refresh calls to the broker after a module reported a rejected generation.',
    );
    for (const [outcome, n] of Object.entries(this.refreshes))
      lines.push(`tb_sidecar_refresh_requests_total{outcome="${outcome}"} ${n}`);

    family('tb_sidecar_watched_users', 'gauge', 'Users this sidecar subscribes to.');
    lines.push(`tb_sidecar_watched_users ${this.gauges.watchedUsers()}`);
    family(
      'tb_sidecar_fresh_users',
      'gauge',
      'Watched users whose token has more than the safety skew left.',
    );
    lines.push(`tb_sidecar_fresh_users ${this.gauges.freshUsers()}`);

    return {
      contentType: 'text/plain; version=0.0.4; charset=utf-8',
      body: `${lines.join('\n')}\n`,
    };
  }
}
