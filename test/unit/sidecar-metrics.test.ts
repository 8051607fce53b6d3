import { describe, expect, it } from 'vitest';
import { openMetricsEndpoint } from '../../shared/telemetry/metrics-endpoint.js';
import { OtelSidecarMetrics } from '../../sidecar/metrics.js';

describe('OtelSidecarMetrics', () => {
  it('renders counters, gauges and cumulative histograms in text format 0.0.4, telemetry off', async () => {
    const endpoint = openMetricsEndpoint('test');
    const metrics = new OtelSidecarMetrics(endpoint, {
      streamUp: () => true,
      streamsUp: () => 2,
      watchedUsers: () => 3,
      freshUsers: () => 2,
      reauthRequiredUsers: () => 1,
    });
    metrics.tokenRead('OK', 0.0002);
    metrics.tokenRead('OK', 0.003);
    metrics.tokenRead('TOKEN_UNAVAILABLE', 2);
    metrics.tokenServed(3, 40);
    metrics.tokenServed(0.5, 12);
    metrics.tokenEvent('applied');
    metrics.tokenEvent('stale');
    metrics.refreshCall('ok');
    metrics.brokerReconnect();
    const { contentType, body } = await metrics.exposition();
    await endpoint.shutdown();
    expect(contentType).toBe('text/plain; version=0.0.4; charset=utf-8');
    expect(body.endsWith('\n')).toBe(true);
    const lines = body.split('\n');
    for (const line of [
      '# TYPE tb_sidecar_token_reads_total counter',
      'tb_sidecar_token_reads_total{code="OK"} 2',
      'tb_sidecar_token_reads_total{code="TOKEN_UNAVAILABLE"} 1',
      'tb_sidecar_token_read_duration_seconds_bucket{le="0.0005"} 1',
      'tb_sidecar_token_read_duration_seconds_bucket{le="0.005"} 2',
      'tb_sidecar_token_read_duration_seconds_bucket{le="1"} 2',
      'tb_sidecar_token_read_duration_seconds_bucket{le="5"} 3',
      'tb_sidecar_token_read_duration_seconds_bucket{le="+Inf"} 3',
      'tb_sidecar_token_read_duration_seconds_count 3',
      'tb_sidecar_token_age_seconds_bucket{le="1"} 1',
      'tb_sidecar_token_age_seconds_bucket{le="5"} 2',
      'tb_sidecar_token_remaining_seconds_bucket{le="10"} 0',
      'tb_sidecar_token_remaining_seconds_bucket{le="15"} 1',
      'tb_sidecar_token_remaining_seconds_bucket{le="60"} 2',
      'tb_sidecar_broker_stream_up 1',
      'tb_sidecar_broker_reconnects_total 1',
      'tb_sidecar_token_events_total{outcome="stale"} 1',
      'tb_sidecar_refresh_requests_total{outcome="ok"} 1',
      'tb_sidecar_watched_users 3',
      'tb_sidecar_fresh_users 2',
      'tb_sidecar_reauth_required_users 1',
    ])
      expect(lines).toContain(line);
    // Every sample belongs to a family declared with HELP and TYPE before it.
    const declared = new Set<string>();
    for (const line of lines) {
      if (line.startsWith('# TYPE ')) declared.add(line.split(' ')[2]!);
      else if (line && !line.startsWith('#'))
        expect(declared.has(line.split(/[{ ]/)[0]!.replace(/_(bucket|sum|count)$/, ''))).toBe(true);
    }
    // The local endpoint carries no scope labels and no target_info.
    expect(body).not.toMatch(/otel_scope_name|target_info/);
  });
});
