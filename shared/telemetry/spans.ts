/** Our own spans: one tracer per process, and how a failure is recorded (its code, no message). */
import { SpanStatusCode, trace, type Attributes, type Span } from '@opentelemetry/api';
import { ATTR } from './span-attributes.js';

export const tracer = trace.getTracer('token-broker');

/**
 * Runs `fn` inside a new active span (so auto-instrumented calls nest under it) and ends it. A
 * throw marks the span failed with the error's stable code only: messages may carry detail that
 * does not belong in telemetry.
 */
export function inSpan<T>(
  name: string,
  attributes: Attributes,
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  return tracer.startActiveSpan(name, { attributes }, async (span) => {
    try {
      return await fn(span);
    } catch (err) {
      markFailed(span, err);
      throw err;
    } finally {
      span.end();
    }
  });
}

export function markFailed(span: Span, err: unknown, code = errorCode(err)): void {
  span.setAttribute(ATTR.errorCode, code);
  span.setStatus({ code: SpanStatusCode.ERROR, message: code });
}

function errorCode(err: unknown): string {
  const code = (err as { code?: unknown } | undefined)?.code;
  if (typeof code === 'string') return code;
  return err instanceof Error ? err.name : 'ERROR';
}
