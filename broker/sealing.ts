import { createHash, randomBytes } from 'node:crypto';

import { CompactEncrypt, compactDecrypt, decodeProtectedHeader } from 'jose';

import { ConfigError, SealError, SealingKeyUnknownError } from './errors.js';

/**
 * State records sealed at rest: compact JWE, `alg: dir`, `enc: A256GCM`, with the key id in the
 * protected header so keys can rotate (new key first, old keys kept until their records are
 * rewritten).
 */
export interface SealingKey {
  kid: string;
  /** 32 bytes of AES-256-GCM key. */
  key: Uint8Array;
}

const KEY_BYTES = 32;
/** Kids go into a JOSE header and into log lines, so keep them plain. */
const KID_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;
const BASE64_PATTERN = /^[A-Za-z0-9+/_-]+={0,2}$/;
/** Protected header field carrying the digest of the bound context (e.g. the session id). */
const BINDING_HEADER = 'sid';

/**
 * Parses `kid1:BASE64,kid2:BASE64` (comma or newline separated; base64 or base64url of exactly 32
 * bytes). The first key seals. Errors name `setting` and the entry's position, never key material.
 */
export function parseSealingKeys(text: string, setting: string): SealingKey[] {
  const entries = text
    .split(/[,\n]/)
    .map((entry) => entry.trim())
    .filter((entry) => entry !== '');
  if (entries.length === 0) {
    throw new ConfigError(setting, 'must list at least one key as kid:base64key');
  }

  const keys: SealingKey[] = [];
  const seen = new Set<string>();
  entries.forEach((entry, index) => {
    const position = `entry ${index + 1}`;
    const colon = entry.indexOf(':');
    if (colon < 0) throw new ConfigError(setting, `${position} must have the form kid:base64key`);
    const kid = entry.slice(0, colon).trim();
    const encoded = entry.slice(colon + 1).trim();
    if (kid === '') throw new ConfigError(setting, `${position} has an empty key id`);
    if (!KID_PATTERN.test(kid)) {
      throw new ConfigError(
        setting,
        `${position} key id must be 1 to 64 characters of A-Z a-z 0-9 . _ -`,
      );
    }
    if (seen.has(kid)) throw new ConfigError(setting, `${position} repeats key id "${kid}"`);
    if (!BASE64_PATTERN.test(encoded)) {
      throw new ConfigError(setting, `${position} (kid "${kid}") key is not base64 or base64url`);
    }
    const key = Buffer.from(encoded, 'base64');
    if (key.length !== KEY_BYTES) {
      throw new ConfigError(
        setting,
        `${position} (kid "${kid}") key must be exactly ${KEY_BYTES} bytes, got ${key.length}`,
      );
    }
    // An all-zero (or any one-byte-value) key is a placeholder or a templating mistake.
    if (key.every((byte) => byte === key[0]))
      throw new ConfigError(
        setting,
        `${position} (kid "${kid}") key is weak: all its bytes are the same value (generate one: README, "Sealing keys")`,
      );
    const same = keys.find((other) => Buffer.from(other.key).equals(key));
    if (same)
      throw new ConfigError(
        setting,
        `${position} (kid "${kid}") has the same key material as kid "${same.kid}": each kid needs its own key`,
      );
    seen.add(kid);
    keys.push({ kid, key: new Uint8Array(key) });
  });
  return keys;
}

/** A fresh random key, e.g. for the embedded mode or an operator's `kid:base64url` line. */
export function generateSealingKey(kid: string): SealingKey {
  if (!KID_PATTERN.test(kid)) {
    throw new TypeError('key id must be 1 to 64 characters of A-Z a-z 0-9 . _ -');
  }
  return { kid, key: new Uint8Array(randomBytes(KEY_BYTES)) };
}

/** Seals with the first key; opens with whichever key the record names. */
export class Sealer {
  readonly currentKid: string;
  readonly #current: Uint8Array;
  readonly #keys = new Map<string, Uint8Array>();

  constructor(keys: readonly SealingKey[]) {
    const first = keys[0];
    if (first === undefined) throw new TypeError('Sealer needs at least one key');
    for (const { kid, key } of keys) {
      if (this.#keys.has(kid)) throw new TypeError(`Sealer got key id "${kid}" twice`);
      if (key.length !== KEY_BYTES) {
        throw new TypeError(`Sealer key "${kid}" must be ${KEY_BYTES} bytes, got ${key.length}`);
      }
      // Copied so a caller wiping or reusing its buffer cannot change our keys.
      this.#keys.set(kid, Uint8Array.from(key));
    }
    this.currentKid = first.kid;
    this.#current = this.#keys.get(first.kid) as Uint8Array;
  }

  /**
   * JSON-encodes `value` and seals it. `aad` (e.g. the session id) is bound into the protected
   * header as a digest, so the record opens only with the same `aad`: it cannot be moved to
   * another session.
   */
  async seal(value: unknown, aad?: string): Promise<string> {
    const json = JSON.stringify(value);
    if (json === undefined) throw new TypeError('cannot seal a value that has no JSON form');
    const header: { alg: 'dir'; enc: 'A256GCM'; kid: string; sid?: string } = {
      alg: 'dir',
      enc: 'A256GCM',
      kid: this.currentKid,
    };
    if (aad !== undefined) header[BINDING_HEADER] = bindingDigest(aad);
    return new CompactEncrypt(new TextEncoder().encode(json))
      .setProtectedHeader(header)
      .encrypt(this.#current);
  }

  /** Opens a record sealed by `seal` with the same `aad`; any failure is a SealError. */
  async open(jwe: string, aad?: string): Promise<unknown> {
    let kid: unknown;
    try {
      kid = decodeProtectedHeader(jwe).kid;
    } catch (cause) {
      throw new SealError('sealed record is malformed', { cause });
    }
    if (typeof kid !== 'string') throw new SealError('sealed record names no key id');
    const key = this.#keys.get(kid);
    if (key === undefined) throw new SealingKeyUnknownError(safeKid(kid));

    let plaintext: Uint8Array;
    let header: Record<string, unknown>;
    try {
      ({ plaintext, protectedHeader: header } = await compactDecrypt(jwe, key, {
        keyManagementAlgorithms: ['dir'],
        contentEncryptionAlgorithms: ['A256GCM'],
      }));
    } catch (cause) {
      throw new SealError(`sealed record failed to decrypt with key id "${kid}" (tampered?)`, {
        kid,
        cause,
      });
    }

    const bound = header[BINDING_HEADER];
    const expected = aad === undefined ? undefined : bindingDigest(aad);
    if (bound !== expected) {
      throw new SealError(`sealed record (key id "${kid}") belongs to a different context`, {
        kid,
      });
    }
    try {
      return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(plaintext)) as unknown;
    } catch {
      // No cause: a JSON parse error would quote the plaintext.
      throw new SealError(`sealed record (key id "${kid}") holds no valid JSON`, { kid });
    }
  }
}

/** A digest, not the context itself, so the header does not spell out tenant and user. */
function bindingDigest(aad: string): string {
  return createHash('sha256').update(aad, 'utf8').digest('base64url');
}

/** A kid read from an unauthenticated header goes into an error message: keep it short and plain. */
function safeKid(kid: string): string {
  return kid.slice(0, 64).replace(/[^A-Za-z0-9._-]/g, '?');
}
