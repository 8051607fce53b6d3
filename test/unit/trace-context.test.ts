import { describe, expect, it } from 'vitest';
import { spanContextOf } from '../../shared/telemetry/trace-context.js';

const TRACE = '4bf92f3577b34da6a3ce929d0e0e4736';
const SPAN = '00f067aa0ba902b7';

describe('spanContextOf (the W3C traceparent in records and events)', () => {
  it('reads version 00 and a later version with more fields, sampled or not', () => {
    expect(spanContextOf(`00-${TRACE}-${SPAN}-01`)).toEqual({
      traceId: TRACE,
      spanId: SPAN,
      traceFlags: 1,
      isRemote: true,
    });
    expect(spanContextOf(`00-${TRACE}-${SPAN}-00`)?.traceFlags).toBe(0);
    expect(spanContextOf(`cc-${TRACE}-${SPAN}-09-what-comes-later`)).toEqual({
      traceId: TRACE,
      spanId: SPAN,
      traceFlags: 9,
      isRemote: true,
    });
  });

  it.each([
    ['empty', ''],
    ['version ff', `ff-${TRACE}-${SPAN}-01`],
    ['version 00 with a fifth field', `00-${TRACE}-${SPAN}-01-x`],
    ['an all-zero trace id', `00-${'0'.repeat(32)}-${SPAN}-01`],
    ['an all-zero span id', `00-${TRACE}-${'0'.repeat(16)}-01`],
    ['upper-case hex', `00-${TRACE.toUpperCase()}-${SPAN}-01`],
    ['a short trace id', `00-${TRACE.slice(1)}-${SPAN}-01`],
    ['no flags', `00-${TRACE}-${SPAN}`],
    ['garbage', 'not a traceparent'],
  ])('refuses %s', (_name, value) => {
    expect(spanContextOf(value)).toBeUndefined();
  });
});
