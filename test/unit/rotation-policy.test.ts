import { describe, expect, it } from 'vitest';

import { rotationPolicyOptions } from '../../broker/config.js';
import { ConfigError } from '../../broker/errors.js';
import {
  DEFAULT_ROTATION_POLICY,
  RotationPolicy,
  type RotationPolicyOptions,
} from '../../broker/rotation/rotation-policy.js';

// Frozen clock: every time below is a fixed epoch-ms number.
const T0 = 1_800_000_000_000;
const SECOND = 1_000;
const MINUTE = 60 * SECOND;
const ALMOST_ONE = 1 - Number.EPSILON;

const fixed = (value: number) => () => value;

/** A seeded generator (mulberry32) so the property loops are reproducible. */
function seeded(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

function configError(run: () => unknown): ConfigError {
  try {
    run();
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return error as ConfigError;
  }
  throw new Error('expected a ConfigError');
}

describe('RotationPolicy.nextRefreshAt', () => {
  it('is due at 0.75 of the lifetime by default without jitter', () => {
    const policy = new RotationPolicy({}, fixed(0));
    expect(policy.nextRefreshAt(T0, T0 + 10 * MINUTE)).toBe(T0 + 7.5 * MINUTE);
    expect(policy.nextRefreshAt(T0, T0 + 60 * MINUTE)).toBe(T0 + 45 * MINUTE);
  });

  it('honours a configured ratio', () => {
    const policy = new RotationPolicy({ ratio: 0.5, jitterRatio: 0 }, fixed(0.5));
    expect(policy.nextRefreshAt(T0, T0 + 10 * MINUTE)).toBe(T0 + 5 * MINUTE);
  });

  it('jitters only earlier, by at most jitterRatio * ttl', () => {
    const ttl = 10 * MINUTE;
    const base = T0 + 0.75 * ttl;
    const maxJitter = DEFAULT_ROTATION_POLICY.jitterRatio * ttl;
    const at = (random: number) =>
      new RotationPolicy({}, fixed(random)).nextRefreshAt(T0, T0 + ttl);

    expect(at(0)).toBe(base);
    expect(at(0.5)).toBe(base - maxJitter / 2);
    expect(at(ALMOST_ONE)).toBeGreaterThanOrEqual(base - maxJitter);
    expect(at(ALMOST_ONE)).toBeLessThan(base - maxJitter + 1);
    for (const random of [0, 0.25, 0.5, 0.999, ALMOST_ONE]) {
      expect(at(random)).toBeGreaterThanOrEqual(base - maxJitter);
      expect(at(random)).toBeLessThanOrEqual(base);
    }
  });

  it('is never later than expiresAt - minLeadMs when the lead clamps, and still jitters', () => {
    // 30 s TTL: 0.75 * ttl leaves 7.5 s, less than the 10 s lead.
    const ttl = 30 * SECOND;
    const expiresAt = T0 + ttl;
    const latest = expiresAt - DEFAULT_ROTATION_POLICY.minLeadMs;
    expect(new RotationPolicy({}, fixed(0)).nextRefreshAt(T0, expiresAt)).toBe(latest);
    expect(new RotationPolicy({}, fixed(0.5)).nextRefreshAt(T0, expiresAt)).toBe(
      latest - 0.025 * ttl,
    );
  });

  it('leaves long lifetimes to the ratio when the lead is far away', () => {
    // 1 h TTL: the ratio point (45 min) is long before expiresAt - 10 s.
    const policy = new RotationPolicy({ minLeadMs: 5 * MINUTE }, fixed(0));
    expect(policy.nextRefreshAt(T0, T0 + 60 * MINUTE)).toBe(T0 + 45 * MINUTE);
    // A large lead wins over the ratio.
    const eager = new RotationPolicy({ minLeadMs: 30 * MINUTE }, fixed(0));
    expect(eager.nextRefreshAt(T0, T0 + 60 * MINUTE)).toBe(T0 + 30 * MINUTE);
  });

  it('falls back to the floor for lifetimes shorter than the lead allows', () => {
    // Floor = issuedAt + minAgeRatio * ratio * ttl = 0.375 * ttl by default.
    for (const random of [0, 0.5, ALMOST_ONE]) {
      const policy = new RotationPolicy({}, fixed(random));
      expect(policy.nextRefreshAt(T0, T0 + 1 * SECOND)).toBe(T0 + 375);
      expect(policy.nextRefreshAt(T0, T0 + 100)).toBe(T0 + 38);
      expect(policy.nextRefreshAt(T0, T0 + 1)).toBeGreaterThanOrEqual(T0);
      expect(policy.nextRefreshAt(T0, T0 + 1)).toBeLessThanOrEqual(T0 + 1);
      expect(policy.nextRefreshAt(T0, T0 + 10 * SECOND)).toBe(T0 + 3_750);
    }
  });

  it('is due at once for a token that is already expired', () => {
    const policy = new RotationPolicy({}, fixed(0.5));
    expect(policy.nextRefreshAt(T0, T0)).toBe(T0);
    expect(policy.nextRefreshAt(T0, T0 - 5 * SECOND)).toBe(T0);
  });

  it('keeps issuedAt <= due <= expiresAt always, and honours the lead when ttl allows', () => {
    const random = seeded(42);
    const ttlRandom = seeded(7);
    const optionSets: Partial<RotationPolicyOptions>[] = [
      {},
      { ratio: 0.5, jitterRatio: 0.2, minLeadMs: 30 * SECOND, minAgeRatio: 0 },
      { ratio: 0.9, jitterRatio: 0.1, minLeadMs: 0, minAgeRatio: 1 },
    ];
    for (const options of optionSets) {
      const policy = new RotationPolicy(options, random);
      const { ratio, minAgeRatio, minLeadMs, jitterRatio } = policy.options;
      // The lead is honoured for every ttl from which the floor no longer overtakes it.
      const leadHonouredFrom = minLeadMs / (1 - minAgeRatio * ratio);
      for (let i = 0; i < 5_000; i += 1) {
        // TTLs spread from 1 ms to about 2.8 h on a log scale, plus some exact small ones.
        const ttl = i < 50 ? i : Math.ceil(Math.exp(ttlRandom() * Math.log(10_000_000)));
        const issuedAt = T0 + Math.floor(ttlRandom() * 1_000_000);
        const expiresAt = issuedAt + ttl;
        const due = policy.nextRefreshAt(issuedAt, expiresAt);

        expect(Number.isInteger(due)).toBe(true);
        expect(due).toBeGreaterThanOrEqual(issuedAt);
        expect(due).toBeLessThanOrEqual(Math.max(issuedAt, expiresAt));
        if (ttl > 0) {
          // Whole milliseconds: bounds that fall between two integers may be off by under 1 ms.
          expect(due).toBeGreaterThanOrEqual(Math.floor(issuedAt + minAgeRatio * ratio * ttl));
          expect(due).toBeLessThanOrEqual(Math.ceil(issuedAt + ratio * ttl));
          if (ttl >= leadHonouredFrom) expect(due).toBeLessThanOrEqual(expiresAt - minLeadMs);
          if (ttl * ratio <= ttl - minLeadMs) {
            // Unclamped: within the jitter window below the ratio point.
            expect(due).toBeGreaterThanOrEqual(issuedAt + (ratio - jitterRatio) * ttl - 1);
          }
        }
      }
    }
  });

  it('rejects non-finite times', () => {
    const policy = new RotationPolicy();
    expect(() => policy.nextRefreshAt(Number.NaN, T0)).toThrow(RangeError);
    expect(() => policy.nextRefreshAt(T0, Number.POSITIVE_INFINITY)).toThrow(RangeError);
  });
});

describe('RotationPolicy.retryAt', () => {
  // Far-off expiry so the expiry rule stays out of the way unless a test wants it.
  const FAR = T0 + 24 * 60 * MINUTE;

  it('doubles the backoff per attempt, with equal jitter, up to the cap', () => {
    const low = new RotationPolicy({}, fixed(0));
    const high = new RotationPolicy({}, fixed(ALMOST_ONE));
    const mid = new RotationPolicy({}, fixed(0.5));
    const ceilings = [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000];
    ceilings.forEach((ceiling, index) => {
      const attempt = index + 1;
      expect(low.retryAt(T0, attempt, undefined, FAR)).toBe(T0 + ceiling / 2);
      expect(mid.retryAt(T0, attempt, undefined, FAR)).toBe(T0 + 0.75 * ceiling);
      expect(high.retryAt(T0, attempt, undefined, FAR)).toBe(T0 + ceiling);
    });
    expect(high.retryAt(T0, 10_000, undefined, FAR)).toBe(T0 + 30_000);
  });

  it('stays within [ceiling/2, ceiling] for any random value', () => {
    const random = seeded(1);
    const policy = new RotationPolicy({}, random);
    for (let i = 0; i < 2_000; i += 1) {
      const attempt = 1 + (i % 12);
      const ceiling = Math.min(30_000, 500 * 2 ** (attempt - 1));
      const at = policy.retryAt(T0, attempt, undefined, FAR);
      expect(Number.isInteger(at)).toBe(true);
      expect(at - T0).toBeGreaterThanOrEqual(ceiling / 2);
      expect(at - T0).toBeLessThanOrEqual(ceiling);
    }
  });

  it('honours Retry-After when longer than the backoff, capped at maxRetryAfterMs', () => {
    const policy = new RotationPolicy({}, fixed(0));
    expect(policy.retryAt(T0, 1, 7_000, FAR)).toBe(T0 + 7_000);
    // Shorter than the backoff: the backoff stands.
    expect(policy.retryAt(T0, 5, 1_000, FAR)).toBe(T0 + 4_000);
    expect(policy.retryAt(T0, 1, 24 * 60 * MINUTE, FAR)).toBe(T0 + 5 * MINUTE);
    expect(policy.retryAt(T0, 1, Number.NaN, FAR)).toBe(T0 + 250);
    expect(policy.retryAt(T0, 1, -5, FAR)).toBe(T0 + 250);
  });

  it('pulls a retry in to land before the access token expires', () => {
    const policy = new RotationPolicy({}, fixed(ALMOST_ONE));
    // Backoff would be 30 s, but the AT expires in 12 s: retry at expiry - 2 s margin.
    expect(policy.retryAt(T0, 8, undefined, T0 + 12 * SECOND)).toBe(T0 + 10 * SECOND);
    // Too close to expiry (less than retryBaseMs left before the margin): plain backoff.
    expect(policy.retryAt(T0, 8, undefined, T0 + 2_300)).toBe(T0 + 30_000);
    // Already expired: plain backoff, bounded by retryMaxMs.
    expect(policy.retryAt(T0, 8, undefined, T0 - MINUTE)).toBe(T0 + 30_000);
  });

  it('lets Retry-After win over the pull-in before expiry', () => {
    const policy = new RotationPolicy({}, fixed(0));
    expect(policy.retryAt(T0, 8, 20 * SECOND, T0 + 12 * SECOND)).toBe(T0 + 20 * SECOND);
  });

  it('is always after now and bounded', () => {
    const random = seeded(99);
    const policy = new RotationPolicy({ retryBaseMs: 1, retryMaxMs: 1 }, random);
    const bound = Math.max(policy.options.retryMaxMs, policy.options.maxRetryAfterMs);
    for (let i = 0; i < 2_000; i += 1) {
      const now = T0 + i;
      const expiresAt = now + Math.floor((random() - 0.5) * 20 * SECOND);
      const retryAfter = i % 3 === 0 ? Math.floor(random() * 10 * MINUTE) : undefined;
      const at = policy.retryAt(now, 1 + (i % 40), retryAfter, expiresAt);
      expect(at).toBeGreaterThan(now);
      expect(at - now).toBeLessThanOrEqual(bound);
    }
    expect(new RotationPolicy({}, fixed(0)).retryAt(T0, 0, undefined, FAR)).toBe(T0 + 250);
  });
});

describe('RotationPolicy options', () => {
  it('uses the defaults and ignores undefined settings', () => {
    expect(new RotationPolicy({ ratio: undefined }).options).toEqual(DEFAULT_ROTATION_POLICY);
  });

  it('config checks the options: each validation error names the option', () => {
    expect(configError(() => rotationPolicyOptions({ ratio: 1.2 })).message).toBe(
      'ratio must be between 0 and 1 (exclusive), got 1.2',
    );
    expect(configError(() => rotationPolicyOptions({ ratio: 0 })).setting).toBe('ratio');
    expect(configError(() => rotationPolicyOptions({ jitterRatio: 0.75 })).setting).toBe(
      'jitterRatio',
    );
    expect(configError(() => rotationPolicyOptions({ jitterRatio: -0.1 })).setting).toBe(
      'jitterRatio',
    );
    expect(configError(() => rotationPolicyOptions({ minLeadMs: -1 })).setting).toBe('minLeadMs');
    expect(configError(() => rotationPolicyOptions({ minAgeRatio: 1.5 })).setting).toBe(
      'minAgeRatio',
    );
    expect(configError(() => rotationPolicyOptions({ retryBaseMs: 0 })).setting).toBe(
      'retryBaseMs',
    );
    expect(configError(() => rotationPolicyOptions({ retryMaxMs: 100 })).setting).toBe(
      'retryMaxMs',
    );
    expect(configError(() => rotationPolicyOptions({ maxRetryAfterMs: -1 })).setting).toBe(
      'maxRetryAfterMs',
    );
    expect(configError(() => rotationPolicyOptions({ minLeadMs: Number.NaN })).message).toBe(
      'minLeadMs must be a finite number, got NaN',
    );
  });

  it('names the setting the caller says the option came from', () => {
    const names = { ratio: 'TB_REFRESH_RATIO', retryBaseMs: 'TB_RETRY_BASE_MS' };
    const error = configError(() => rotationPolicyOptions({ ratio: 1.2 }, names));
    expect(error.setting).toBe('TB_REFRESH_RATIO');
    expect(error.message).toBe('TB_REFRESH_RATIO must be between 0 and 1 (exclusive), got 1.2');
    expect(configError(() => rotationPolicyOptions({ retryMaxMs: 1 }, names)).message).toBe(
      'retryMaxMs must be at least TB_RETRY_BASE_MS (500), got 1',
    );
  });

  it('keeps results in bounds when the random source misbehaves', () => {
    for (const value of [-1, 2, Number.NaN]) {
      const policy = new RotationPolicy({}, fixed(value));
      const due = policy.nextRefreshAt(T0, T0 + 10 * MINUTE);
      expect(due).toBeGreaterThanOrEqual(T0 + 0.7 * 10 * MINUTE);
      expect(due).toBeLessThanOrEqual(T0 + 0.75 * 10 * MINUTE);
    }
  });
});
