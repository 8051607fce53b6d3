import { describe, expect, it } from 'vitest';
import { createInstrumentations } from '../../shared/telemetry/instrumentations.js';
import { telemetrySettings } from '../../shared/telemetry/telemetry-settings.js';

describe('telemetrySettings', () => {
  it('is off by default, as in tests and the demo', () => {
    expect(telemetrySettings({})).toMatchObject({
      enabled: false,
      traceExporters: [],
      metricExporters: [],
    });
    expect(telemetrySettings({}).reason).toMatch(/off by default/);
  });

  it('turns on when an exporter is named, with no OTLP metric reader nobody asked for', () => {
    expect(telemetrySettings({ OTEL_TRACES_EXPORTER: 'otlp' })).toMatchObject({
      enabled: true,
      traceExporters: ['otlp'],
      metricExporters: [],
    });
    expect(
      telemetrySettings({
        OTEL_TRACES_EXPORTER: 'none',
        OTEL_METRICS_EXPORTER: 'prometheus',
        OTEL_EXPORTER_PROMETHEUS_PORT: '9465',
      }),
    ).toMatchObject({
      enabled: true,
      traceExporters: [],
      metricExporters: ['prometheus'],
      prometheus: { host: undefined, port: 9465 },
    });
    expect(telemetrySettings({ TB_TELEMETRY: 'on' })).toMatchObject({
      enabled: true,
      traceExporters: ['otlp'],
      metricExporters: [],
    });
    expect(
      telemetrySettings({ OTEL_TRACES_EXPORTER: 'none', OTEL_METRICS_EXPORTER: 'none' }),
    ).toMatchObject({ enabled: false });
  });

  it('OTEL_SDK_DISABLED=true and TB_TELEMETRY=off win over everything', () => {
    const asked = { OTEL_TRACES_EXPORTER: 'otlp', OTEL_METRICS_EXPORTER: 'prometheus' };
    expect(telemetrySettings({ ...asked, OTEL_SDK_DISABLED: 'true' }).enabled).toBe(false);
    expect(
      telemetrySettings({ ...asked, TB_TELEMETRY: 'on', OTEL_SDK_DISABLED: 'TRUE' }).enabled,
    ).toBe(false);
    expect(telemetrySettings({ ...asked, TB_TELEMETRY: 'off' }).enabled).toBe(false);
  });

  it('adds client spans only as TB_TRACE_CLIENT_SPANS lists them, and only with telemetry on', () => {
    const on = { OTEL_TRACES_EXPORTER: 'otlp' };
    expect(telemetrySettings(on).clientSpans).toEqual({ redis: false, http: false });
    expect(telemetrySettings({ ...on, TB_TRACE_CLIENT_SPANS: 'none' }).clientSpans).toEqual({
      redis: false,
      http: false,
    });
    expect(telemetrySettings({ ...on, TB_TRACE_CLIENT_SPANS: ' Redis ' }).clientSpans).toEqual({
      redis: true,
      http: false,
    });
    expect(telemetrySettings({ ...on, TB_TRACE_CLIENT_SPANS: 'http,redis' }).clientSpans).toEqual({
      redis: true,
      http: true,
    });
    expect(telemetrySettings({ TB_TRACE_CLIENT_SPANS: 'redis' }).clientSpans.redis).toBe(false);
    expect(() => telemetrySettings({ ...on, TB_TRACE_CLIENT_SPANS: 'redis,grpc' })).toThrow(
      /^TB_TRACE_CLIENT_SPANS names an unknown kind "grpc" \(known: redis, http, none\)/,
    );
    // Constructing enables them: each is disabled again at once.
    const names = (redis: boolean, http: boolean) =>
      createInstrumentations({ redis, http }).map((i) => {
        i.disable();
        return i.instrumentationName;
      });
    expect(names(false, false)).toEqual(['@opentelemetry/instrumentation-grpc']);
    expect(names(true, false)).toContain('@opentelemetry/instrumentation-ioredis');
    expect(names(false, true)).toEqual([
      '@opentelemetry/instrumentation-grpc',
      '@opentelemetry/instrumentation-http',
      '@opentelemetry/instrumentation-undici',
    ]);
  });

  it('refuses a bad value, naming the variable', () => {
    expect(() => telemetrySettings({ TB_TELEMETRY: 'yes' })).toThrow(
      /^TB_TELEMETRY must be on or off/,
    );
    expect(() => telemetrySettings({ OTEL_METRICS_EXPORTER: 'prom' })).toThrow(
      /^OTEL_METRICS_EXPORTER names an unknown exporter "prom"/,
    );
    expect(() => telemetrySettings({ OTEL_EXPORTER_PROMETHEUS_PORT: '94a' })).toThrow(
      /^OTEL_EXPORTER_PROMETHEUS_PORT/,
    );
  });
});
