import { describe, expect, it } from 'vitest';
import { InvalidParameterError } from '../../sidecar/errors.js';
import { reconnectDelayMs } from '../../sidecar/reconnect-backoff.js';
import {
  DEFAULT_WAIT_MS,
  parseTokenRequest,
  TokenRequestCache,
} from '../../sidecar/token-request.js';

describe('parseTokenRequest', () => {
  it('decodes tenant and user, and defaults and caps the wait', () => {
    expect(parseTokenRequest('diku/alice', '', 30_000)).toEqual({
      tenant: 'diku',
      user: 'alice',
      waitMs: DEFAULT_WAIT_MS,
      minGeneration: 0,
    });
    expect(parseTokenRequest('di%2Fku/a%40b', 'wait=250&min_generation=7', 30_000)).toEqual({
      tenant: 'di/ku',
      user: 'a@b',
      waitMs: 250,
      minGeneration: 7,
    });
    expect(parseTokenRequest('d/u', 'wait=2000000000', 30_000).waitMs).toBe(30_000);
    expect(parseTokenRequest('d/u', '', 1_000).waitMs).toBe(1_000);
    expect(parseTokenRequest('d/u', 'wait=0&', 1_000).waitMs).toBe(0);
  });

  it.each<[string, string, string]>([
    ['diku', '', 'path'],
    ['diku/alice/x', '', 'path'],
    [`diku/${'u'.repeat(257)}`, '', 'user'],
    [`${'%41'.repeat(257)}/alice`, '', 'tenant'],
    ['diku/%E0%A4%A', '', 'user'],
    ['diku/a%0Ab', '', 'user'],
    ['diku/alice', 'wait=12.5', 'wait'],
    ['diku/alice', 'wait=2147483648', 'wait'],
    ['diku/alice', 'wait', 'wait'],
    ['diku/alice', 'min_generation=1e3', 'min_generation'],
    ['diku/alice', 'min_generation=1234567890123456', 'min_generation'],
    ['diku/alice', 'min_generation=1&min_generation=2', 'query parameter "min_generation"'],
    ['diku/alice', 'generation=1', 'query parameter "generation"'],
  ])('refuses %s ? %s, naming %s', (rest, query, parameter) => {
    let error: unknown;
    try {
      parseTokenRequest(rest, query, 30_000);
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(InvalidParameterError);
    expect((error as InvalidParameterError).parameter).toBe(parameter);
    expect((error as InvalidParameterError).status).toBe(400);
  });
});

describe('reconnectDelayMs', () => {
  const options = { baseMs: 200, maxMs: 10_000 };

  it('doubles per attempt with up to half of each step random, capped at the maximum', () => {
    expect(reconnectDelayMs(0, options, () => 0)).toBe(100);
    expect(reconnectDelayMs(0, options, () => 1)).toBe(200);
    expect(reconnectDelayMs(3, options, () => 0)).toBe(800);
    expect(reconnectDelayMs(3, options, () => 0.999)).toBeLessThanOrEqual(1_600);
    expect(reconnectDelayMs(50, options, () => 1)).toBe(10_000);
    expect(reconnectDelayMs(50, options, () => 0)).toBe(5_000);
  });
});

describe('TokenRequestCache', () => {
  it('answers as parseTokenRequest does, and the same parse for the same URL', () => {
    const cache = new TokenRequestCache(30_000, 10);
    const first = cache.get('di%2Fku/a%40b', 'wait=250&min_generation=7');
    expect(first).toEqual(parseTokenRequest('di%2Fku/a%40b', 'wait=250&min_generation=7', 30_000));
    expect(cache.get('di%2Fku/a%40b', 'wait=250&min_generation=7')).toBe(first);
    expect(cache.get('diku/alice', '')).toEqual(parseTokenRequest('diku/alice', '', 30_000));
    expect(cache.get('diku/alice', 'wait=0')).not.toBe(cache.get('diku/alice', ''));
  });

  it('keeps 4 URLs per user it may hold (at least 1,024), dropping the oldest one at a time', () => {
    expect(new TokenRequestCache(1_000, 10).capacity).toBe(1_024);
    const cache = new TokenRequestCache(1_000, 2_000);
    expect(cache.capacity).toBe(8_000);
    const held = Array.from({ length: 8_000 }, (_, i) => cache.get(`diku/user-${i}`, ''));
    expect(cache.size).toBe(8_000);
    // One more: only the oldest goes, the others are still the same parses (no clearing).
    cache.get('diku/one-more', '');
    expect(cache.size).toBe(8_000);
    expect(cache.get('diku/user-1', '')).toBe(held[1]);
    expect(cache.get('diku/user-7999', '')).toBe(held[7_999]);
    expect(cache.get('diku/user-0', '')).not.toBe(held[0]);
    expect(cache.get('diku/user-0', '')).toEqual(held[0]);
    expect(cache.size).toBe(8_000);
  });

  it('keeps neither URLs that fail to parse nor long ones', () => {
    const cache = new TokenRequestCache(1_000, 1);
    expect(() => cache.get('diku', '')).toThrow(InvalidParameterError);
    expect(() => cache.get('diku/u', 'wait=x')).toThrow(InvalidParameterError);
    const long = `diku/${'u'.repeat(256)}`;
    expect(cache.get(long, '')).toEqual(parseTokenRequest(long, '', 1_000));
    expect(cache.size).toBe(0);
  });
});
