import { describe, expect, it } from 'vitest';
import { KeySpace } from '../../broker/store/keys.js';

describe('KeySpace', () => {
  const keys = new KeySpace('tb:');

  it('puts one hash tag per session in its state and lock keys', () => {
    const ref = { tenant: 'diku', user: 'alice' };
    expect(keys.session(ref)).toBe('tb:session:{diku:alice}');
    expect(keys.lock(ref)).toBe('tb:lock:{diku:alice}');
  });

  it('keeps ids with braces and colons inside one tag and apart from each other', () => {
    const tricky = [
      { tenant: 'a:b', user: 'c' },
      { tenant: 'a', user: 'b:c' },
      { tenant: 'x}', user: '{y' },
      { tenant: 'ünï', user: 'c%3A' },
    ];
    const ids = tricky.map((ref) => KeySpace.sessionId(ref));
    expect(new Set(ids).size).toBe(tricky.length);
    for (const [i, ref] of tricky.entries()) {
      const key = keys.session(ref);
      // Exactly one '{' and one '}' so Redis Cluster hashes the whole id.
      expect(key.split('{').length - 1).toBe(1);
      expect(key.split('}').length - 1).toBe(1);
      expect(KeySpace.parseSessionId(ids[i]!)).toEqual(ref);
    }
  });

  it('rejects a malformed id', () => {
    expect(() => KeySpace.parseSessionId('no-colon')).toThrow(/malformed session id/);
  });
});
