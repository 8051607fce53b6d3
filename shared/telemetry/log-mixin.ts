/**
 * pino `mixin`: every log line written inside a span carries its trace_id and span_id, so logs and
 * traces join. Outside a span (or with telemetry off) it adds nothing.
 */
import { isSpanContextValid, trace } from '@opentelemetry/api';

export function traceLogFields(): Record<string, string> {
  const ctx = trace.getActiveSpan()?.spanContext();
  if (!ctx || !isSpanContextValid(ctx)) return {};
  return { trace_id: ctx.traceId, span_id: ctx.spanId };
}
