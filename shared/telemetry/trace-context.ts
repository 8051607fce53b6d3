/**
 * The W3C `traceparent` carried in session records and Watch events, so a rotation can be
 * followed into every sidecar that received its token. The field is W3C whatever propagator the
 * process configured, so it is written and parsed here, not through the global propagator.
 */
import {
  context,
  isSpanContextValid,
  trace,
  type Context,
  type Span,
  type SpanContext,
} from '@opentelemetry/api';

/**
 * W3C Trace Context, version 00 and later (a later version may append fields): version, trace id,
 * span id, flags, lower-case hex. Parsed here rather than with @opentelemetry/core, which would
 * load 30 modules at every start for this one function when telemetry is off.
 */
const TRACEPARENT = /^\s?([\da-f]{2})-([\da-f]{32})-([\da-f]{16})-([\da-f]{2})(-.*)?\s?$/;

function parseTraceParent(value: string): Omit<SpanContext, 'isRemote'> | undefined {
  const match = TRACEPARENT.exec(value);
  // Version ff is invalid; version 00 has exactly four fields.
  if (!match || match[1] === 'ff' || (match[1] === '00' && match[5] !== undefined))
    return undefined;
  return { traceId: match[2]!, spanId: match[3]!, traceFlags: parseInt(match[4]!, 16) };
}

/** `00-<trace id>-<span id>-<flags>` of the span, or '' when it is not a real (sampled or not) span. */
export function traceparentOf(span: Span | undefined): string {
  const ctx = span?.spanContext();
  if (!ctx || !isSpanContextValid(ctx)) return '';
  return `00-${ctx.traceId}-${ctx.spanId}-${(ctx.traceFlags & 0xff).toString(16).padStart(2, '0')}`;
}

/** The active span's traceparent ('' outside any span or with telemetry off). */
export function currentTraceparent(): string {
  return traceparentOf(trace.getActiveSpan());
}

/** The remote span a traceparent names, or undefined for '' and malformed values. */
export function spanContextOf(traceparent: string): SpanContext | undefined {
  if (traceparent === '') return undefined;
  const parsed = parseTraceParent(traceparent);
  return parsed && isSpanContextValid(parsed) ? { ...parsed, isRemote: true } : undefined;
}

/** A context whose parent is the span a traceparent names (the root context when there is none). */
export function contextOf(traceparent: string): Context {
  const remote = spanContextOf(traceparent);
  return remote ? trace.setSpanContext(context.active(), remote) : context.active();
}
