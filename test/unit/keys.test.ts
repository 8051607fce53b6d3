import { describe, expect, it } from 'vitest';
import { KeySpace, STATE_SHARDS } from '../../broker/store/keys.js';

/** The hash tag Redis Cluster hashes: the text between the first `{` and the next `}`. */
function hashTag(key: string): string {
  const open = key.indexOf('{');
  const close = key.indexOf('}', open + 1);
  return open >= 0 && close > open + 1 ? key.slice(open + 1, close) : key;
}

describe('KeySpace', () => {
  const keys = new KeySpace('tb:');

  it("puts a session's hash, due entry, indexes and channel in its shard's slot", () => {
    const ref = { tenant: 'diku', user: 'alice' };
    const shard = KeySpace.shardOf(KeySpace.sessionId(ref));
    expect(keys.session(ref)).toBe(`tb:{s:${shard}}:session:diku:alice`);
    const tag = hashTag(keys.session(ref));
    expect(tag).toBe(`s:${shard}`);
    for (const key of [
      keys.due(shard),
      keys.index(shard),
      keys.reauth(shard),
      keys.dead(shard),
      keys.events(shard),
    ])
      expect(hashTag(key)).toBe(tag);
    // Locks stay per session, on the lock nodes.
    expect(keys.lock(ref)).toBe('tb:lock:{diku:alice}');
  });

  it('derives the shard from the id alone, stably (stored data depends on it)', () => {
    // FNV-1a 32-bit of the UTF-8 id, mod 16 (published test vectors of FNV-1a): changing it
    // would orphan every stored session.
    expect(KeySpace.shardOf('')).toBe(0x811c9dc5 % STATE_SHARDS);
    expect(KeySpace.shardOf('a')).toBe(0xe40c292c % STATE_SHARDS);
    expect(KeySpace.shardOf('foobar')).toBe(0xbf9cf968 % STATE_SHARDS);
    const seen = new Set<number>();
    for (let i = 0; i < 1_000; i++) {
      const shard = KeySpace.shardOf(`diku:user-${i}`);
      expect(shard).toBeGreaterThanOrEqual(0);
      expect(shard).toBeLessThan(STATE_SHARDS);
      seen.add(shard);
    }
    expect(seen.size).toBe(STATE_SHARDS);
    expect(KeySpace.shards).toEqual(Array.from({ length: STATE_SHARDS }, (_, i) => i));
  });

  it('keeps ids with braces and colons out of the hash tag and apart from each other', () => {
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
      // Exactly one '{' and one '}': the shard tag, so Redis Cluster hashes the shard only.
      expect(key.split('{').length - 1).toBe(1);
      expect(key.split('}').length - 1).toBe(1);
      expect(hashTag(key)).toBe(`s:${KeySpace.shardOf(ids[i]!)}`);
      expect(KeySpace.parseSessionId(ids[i]!)).toEqual(ref);
    }
  });

  it('names the legacy layout for the migration', () => {
    expect(keys.legacy.session('diku:alice')).toBe('tb:session:{diku:alice}');
    expect([keys.legacy.due, keys.legacy.index, keys.legacy.reauth]).toEqual([
      'tb:due',
      'tb:index',
      'tb:reauth',
    ]);
  });

  it('rejects a malformed id', () => {
    expect(() => KeySpace.parseSessionId('no-colon')).toThrow(/malformed session id/);
  });
});
