import { createHash } from 'node:crypto';

import { CompactEncrypt, compactDecrypt, decodeProtectedHeader } from 'jose';
import { describe, expect, it } from 'vitest';

import { ConfigError, SealError } from '../../broker/errors.js';
import {
  Sealer,
  generateSealingKey,
  parseSealingKeys,
  type SealingKey,
} from '../../broker/sealing.js';

const SETTING = 'TB_SEALING_KEYS';
const SECRET_RT = 'rt-7f3c9e1a-distinctive-refresh-token-value';

function keyOf(kid: string, fill: number): SealingKey {
  return { kid, key: new Uint8Array(32).fill(fill) };
}

async function sealError(run: () => Promise<unknown>): Promise<SealError> {
  try {
    await run();
  } catch (error) {
    expect(error).toBeInstanceOf(SealError);
    return error as SealError;
  }
  throw new Error('expected a SealError');
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

/** Flips one character of the JWE part at `index` (0 header .. 4 tag). */
function tamper(jwe: string, index: number): string {
  const parts = jwe.split('.');
  const part = parts[index]!;
  const middle = Math.floor(part.length / 2);
  const flipped = part[middle] === 'A' ? 'B' : 'A';
  parts[index] = part.slice(0, middle) + flipped + part.slice(middle + 1);
  return parts.join('.');
}

describe('Sealer', () => {
  const record = { accessToken: 'at-value', refreshToken: SECRET_RT, generation: 7 };

  it('round-trips a value as a dir/A256GCM compact JWE naming its kid', async () => {
    const sealer = new Sealer([generateSealingKey('k1')]);
    const jwe = await sealer.seal(record, 'acme:alice');
    expect(jwe.split('.')).toHaveLength(5);
    expect(decodeProtectedHeader(jwe)).toMatchObject({ alg: 'dir', enc: 'A256GCM', kid: 'k1' });
    expect(await sealer.open(jwe, 'acme:alice')).toEqual(record);

    const unbound = await sealer.seal([1, 'two', null]);
    expect(await sealer.open(unbound)).toEqual([1, 'two', null]);
  });

  it('puts no plaintext in the output, in clear or base64 form', async () => {
    const sealer = new Sealer([generateSealingKey('k1')]);
    const jwe = await sealer.seal(record, 'acme:alice');
    const forms = [
      SECRET_RT,
      Buffer.from(SECRET_RT).toString('base64'),
      Buffer.from(SECRET_RT).toString('base64url'),
      Buffer.from(JSON.stringify(record)).toString('base64url'),
      'acme:alice',
      Buffer.from('acme:alice').toString('base64url'),
    ];
    for (const form of forms) {
      // Long substrings too: base64 of a string embedded at another offset shifts its alphabet.
      expect(jwe).not.toContain(form.slice(0, 16));
      expect(jwe).not.toContain(form);
    }
  });

  it('seals differently each time', async () => {
    const sealer = new Sealer([generateSealingKey('k1')]);
    expect(await sealer.seal(record)).not.toBe(await sealer.seal(record));
  });

  it('opens records of an older key after rotation and seals with the new one', async () => {
    const a = generateSealingKey('key-a');
    const b = generateSealingKey('key-b');
    const old = await new Sealer([a]).seal(record, 'acme:alice');

    const rotated = new Sealer([b, a]);
    expect(rotated.currentKid).toBe('key-b');
    expect(await rotated.open(old, 'acme:alice')).toEqual(record);
    const fresh = await rotated.seal(record, 'acme:alice');
    expect(decodeProtectedHeader(fresh).kid).toBe('key-b');

    const error = await sealError(() => new Sealer([b]).open(old, 'acme:alice'));
    expect(error.message).toContain('key-a');
  });

  it('rejects a record whose kid names a different key', async () => {
    const sealed = await new Sealer([keyOf('k1', 1)]).seal(record);
    const error = await sealError(() => new Sealer([keyOf('k1', 2)]).open(sealed));
    expect(error.message).toContain('k1');
  });

  it('rejects tampered records with a SealError that leaks nothing', async () => {
    const sealer = new Sealer([generateSealingKey('k1')]);
    const jwe = await sealer.seal(record, 'acme:alice');
    for (const index of [0, 2, 3, 4]) {
      const error = await sealError(() => sealer.open(tamper(jwe, index), 'acme:alice'));
      expect(error.message).not.toContain(SECRET_RT);
    }
    await sealError(() => sealer.open('not a jwe', 'acme:alice'));
    await sealError(() => sealer.open(jwe.slice(0, -4), 'acme:alice'));
  });

  it('rejects a record opened with a different or missing aad', async () => {
    const sealer = new Sealer([generateSealingKey('k1')]);
    const jwe = await sealer.seal(record, 'acme:alice');
    const moved = await sealError(() => sealer.open(jwe, 'acme:bob'));
    expect(moved.message).toContain('k1');
    await sealError(() => sealer.open(jwe));
    await sealError(async () => sealer.open(await sealer.seal(record), 'acme:alice'));
  });

  it('names the unknown kid without echoing arbitrary header content', async () => {
    const header = Buffer.from(
      JSON.stringify({ alg: 'dir', enc: 'A256GCM', kid: 'evil"kid\n' }),
    ).toString('base64url');
    const error = await sealError(() =>
      new Sealer([generateSealingKey('k1')]).open(`${header}..AAAA.AAAA.AAAA`),
    );
    expect(error.message).toBe('sealed record uses unknown key id "evil?kid?"');
  });

  it('keeps the promise contract: failures reject rather than throw, the sync forms throw', async () => {
    const sealer = new Sealer([generateSealingKey('k1')]);
    let pending: Promise<unknown> | undefined;
    expect(() => (pending = sealer.open('not a jwe'))).not.toThrow();
    await expect(pending).rejects.toBeInstanceOf(SealError);
    expect(() => (pending = sealer.seal(undefined))).not.toThrow();
    await expect(pending).rejects.toBeInstanceOf(TypeError);
    expect(() => sealer.openSync('not a jwe')).toThrow(SealError);
    expect(sealer.openSync(sealer.sealSync(record, 'acme:alice'), 'acme:alice')).toEqual(record);
  });

  it('refuses an empty or inconsistent key list', () => {
    expect(() => new Sealer([])).toThrow(TypeError);
    expect(() => new Sealer([keyOf('k1', 1), keyOf('k1', 2)])).toThrow(TypeError);
    expect(() => new Sealer([{ kid: 'k1', key: new Uint8Array(16) }])).toThrow(TypeError);
  });
});

describe('Sealer and jose interoperate (the compact JWE format every stored record has)', () => {
  const record = { accessToken: 'at-value', refreshToken: SECRET_RT, generation: 7 };
  const sealingKey = keyOf('k1', 0);
  sealingKey.key.forEach((_, i) => (sealingKey.key[i] = (i * 37 + 11) & 0xff));
  const sid = (aad: string) => createHash('sha256').update(aad, 'utf8').digest('base64url');
  const joseOptions = {
    keyManagementAlgorithms: ['dir'],
    contentEncryptionAlgorithms: ['A256GCM'],
  };

  /** What the broker sealed with jose before it sealed with node:crypto itself. */
  async function joseSeal(value: unknown, header: Record<string, unknown>): Promise<string> {
    return new CompactEncrypt(new TextEncoder().encode(JSON.stringify(value)))
      .setProtectedHeader({ alg: 'dir', enc: 'A256GCM', ...header })
      .encrypt(sealingKey.key);
  }

  it('jose opens what the broker seals, with and without the sid binding', async () => {
    const sealer = new Sealer([sealingKey]);
    const bound = await compactDecrypt(
      await sealer.seal(record, 'acme:alice'),
      sealingKey.key,
      joseOptions,
    );
    expect(bound.protectedHeader).toEqual({
      alg: 'dir',
      enc: 'A256GCM',
      kid: 'k1',
      sid: sid('acme:alice'),
    });
    expect(JSON.parse(new TextDecoder().decode(bound.plaintext))).toEqual(record);

    const unbound = await compactDecrypt(sealer.sealSync(record), sealingKey.key, joseOptions);
    expect(unbound.protectedHeader).toEqual({ alg: 'dir', enc: 'A256GCM', kid: 'k1' });
    expect(JSON.parse(new TextDecoder().decode(unbound.plaintext))).toEqual(record);
  });

  it('jose refuses what the broker sealed once a header, IV, ciphertext or tag is tampered with', async () => {
    const jwe = new Sealer([sealingKey]).sealSync(record, 'acme:alice');
    for (const index of [0, 2, 3, 4]) {
      await expect(
        compactDecrypt(tamper(jwe, index), sealingKey.key, joseOptions),
      ).rejects.toThrow();
    }
  });

  it('the broker opens what jose seals, with and without the sid binding', async () => {
    const sealer = new Sealer([sealingKey]);
    const bound = await joseSeal(record, { kid: 'k1', sid: sid('acme:alice') });
    expect(await sealer.open(bound, 'acme:alice')).toEqual(record);
    expect(sealer.openSync(bound, 'acme:alice')).toEqual(record);
    await sealError(() => sealer.open(bound, 'acme:bob'));
    await sealError(() => sealer.open(bound));

    const unbound = await joseSeal(record, { kid: 'k1' });
    expect(sealer.openSync(unbound)).toEqual(record);
    await sealError(() => sealer.open(unbound, 'acme:alice'));
  });

  it('the broker refuses what jose sealed once the header, IV, ciphertext or tag is tampered with', async () => {
    const sealer = new Sealer([sealingKey]);
    const jwe = await joseSeal(record, { kid: 'k1', sid: sid('acme:alice') });
    for (const index of [0, 2, 3, 4]) {
      const error = await sealError(() => sealer.open(tamper(jwe, index), 'acme:alice'));
      expect(error.message).not.toContain(SECRET_RT);
    }
    // The header is authenticated as it was written: the same fields re-encoded in another
    // order do not open either.
    const [, ...rest] = jwe.split('.');
    const reordered = Buffer.from(
      JSON.stringify({ kid: 'k1', alg: 'dir', enc: 'A256GCM', sid: sid('acme:alice') }),
    ).toString('base64url');
    const error = await sealError(() => sealer.open([reordered, ...rest].join('.'), 'acme:alice'));
    expect(error.message).toBe('sealed record failed to decrypt with key id "k1" (tampered?)');
  });

  it('refuses records jose would refuse: other algorithms, crit, zip, an encrypted key, short IV or tag', async () => {
    const sealer = new Sealer([sealingKey]);
    const jwe = sealer.sealSync(record);
    const [header, , iv, ciphertext, tag] = jwe.split('.') as [
      string,
      string,
      string,
      string,
      string,
    ];
    const withHeader = (fields: Record<string, unknown>) =>
      [Buffer.from(JSON.stringify(fields)).toString('base64url'), '', iv, ciphertext, tag].join(
        '.',
      );
    const cases = [
      withHeader({ alg: 'A256KW', enc: 'A256GCM', kid: 'k1' }),
      withHeader({ alg: 'dir', enc: 'A128GCM', kid: 'k1' }),
      withHeader({ alg: 'dir', enc: 'A256GCM', kid: 'k1', crit: ['exp'], exp: 1 }),
      withHeader({ alg: 'dir', enc: 'A256GCM', kid: 'k1', zip: 'DEF' }),
      [header, 'AAAA', iv, ciphertext, tag].join('.'),
      [header, '', iv.slice(0, 8), ciphertext, tag].join('.'),
      [header, '', iv, ciphertext, tag.slice(0, 16)].join('.'),
      [header, '', iv, `${ciphertext}*`, tag].join('.'),
    ];
    for (const bad of cases) {
      const error = await sealError(() => sealer.open(bad));
      expect(error.message).toBe('sealed record failed to decrypt with key id "k1" (tampered?)');
      expect(error.kid).toBe('k1');
    }
    for (const bad of [
      '',
      '.',
      'e30',
      'e30.e30',
      'WzFd..AAAA.AAAA.AAAA',
      '!!!..AAAA.AAAA.AAAA',
      `${jwe}.AAAA`,
    ]) {
      const error = await sealError(() => sealer.open(bad));
      expect(error.message).toBe('sealed record is malformed');
    }
    const noKid = Buffer.from(JSON.stringify({ alg: 'dir', enc: 'A256GCM' })).toString('base64url');
    expect(
      (await sealError(() => sealer.open(`${noKid}..${iv}.${ciphertext}.${tag}`))).message,
    ).toBe('sealed record names no key id');
  });
});

describe('parseSealingKeys', () => {
  const keyA = Uint8Array.from({ length: 32 }, (_, i) => 0xfb ^ i);
  const keyB = Uint8Array.from({ length: 32 }, (_, i) => i * 7);
  const a64 = Buffer.from(keyA).toString('base64');
  const b64url = Buffer.from(keyB).toString('base64url');

  it('parses comma- and newline-separated kid:key entries, base64 or base64url', () => {
    const keys = parseSealingKeys(`k-new:${b64url}, k-old:${a64}\n`, SETTING);
    expect(keys.map((k) => k.kid)).toEqual(['k-new', 'k-old']);
    expect(keys[0]!.key).toEqual(keyB);
    expect(keys[1]!.key).toEqual(keyA);
    expect(parseSealingKeys(`k1:${a64}\nk2:${b64url}`, SETTING)).toHaveLength(2);
    expect(parseSealingKeys(`k1:${a64.replace(/=+$/, '')}`, SETTING)[0]!.key).toEqual(keyA);
  });

  it('accepts what generateSealingKey produces', () => {
    const generated = generateSealingKey('gen-1');
    const text = `${generated.kid}:${Buffer.from(generated.key).toString('base64url')}`;
    expect(parseSealingKeys(text, SETTING)).toEqual([generated]);
    expect(() => generateSealingKey('bad kid')).toThrow(TypeError);
  });

  it('fails naming the setting and position, never echoing key material (weak and repeated keys too)', () => {
    const short = Buffer.from(new Uint8Array(16).fill(0xab)).toString('base64');
    const long = Buffer.from(new Uint8Array(33).fill(0xcd)).toString('base64url');
    const zero = Buffer.alloc(32).toString('base64');
    const same = Buffer.alloc(32, 0x5a).toString('base64url');
    const cases: [string, string][] = [
      ['', 'must list at least one key'],
      [' ,\n', 'must list at least one key'],
      [`k1:${a64},${b64url}`, 'entry 2 must have the form kid:base64key'],
      [`:${a64}`, 'entry 1 has an empty key id'],
      [`bad kid:${a64}`, 'entry 1 key id must be'],
      [`k1:${a64},k1:${b64url}`, 'entry 2 repeats key id "k1"'],
      [`k1:${a64},k2:${short}`, 'entry 2 (kid "k2") key must be exactly 32 bytes, got 16'],
      [`k1:${long}`, 'entry 1 (kid "k1") key must be exactly 32 bytes, got 33'],
      [`k1:${a64}AAAA`, 'entry 1 (kid "k1") key is not base64'],
      [`k1:${a64.slice(0, 20)}*${a64.slice(21)}`, 'entry 1 (kid "k1") key is not base64'],
      [`k1:${zero}`, 'entry 1 (kid "k1") key is weak: all its bytes are the same value'],
      [`k1:${a64},k2:${same}`, 'entry 2 (kid "k2") key is weak: all its bytes are the same value'],
      [
        `k1:${a64},k2:${b64url},k3:${a64}`,
        'entry 3 (kid "k3") has the same key material as kid "k1"',
      ],
      [
        `k1:${b64url},k2:${Buffer.from(keyB).toString('base64')}`,
        'entry 2 (kid "k2") has the same key material as kid "k1"',
      ],
    ];
    for (const [text, problem] of cases) {
      const error = configError(() => parseSealingKeys(text, SETTING));
      expect(error.setting).toBe(SETTING);
      expect(error.message).toContain(`${SETTING} ${problem}`);
      for (const material of [
        a64,
        b64url,
        short,
        long,
        zero,
        same,
        a64.slice(0, 12),
        b64url.slice(0, 12),
      ]) {
        expect(error.message).not.toContain(material);
      }
    }
  });
});
