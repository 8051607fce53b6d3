import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createSecretKey,
  randomBytes,
  type KeyObject,
} from 'node:crypto';

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
  readonly #current: KeyObject;
  readonly #keys = new Map<string, KeyObject>();

  constructor(keys: readonly SealingKey[]) {
    const first = keys[0];
    if (first === undefined) throw new TypeError('Sealer needs at least one key');
    for (const { kid, key } of keys) {
      if (this.#keys.has(kid)) throw new TypeError(`Sealer got key id "${kid}" twice`);
      if (key.length !== KEY_BYTES) {
        throw new TypeError(`Sealer key "${kid}" must be ${KEY_BYTES} bytes, got ${key.length}`);
      }
      // A KeyObject holds its own copy, so a caller wiping or reusing its buffer cannot change
      // our keys.
      this.#keys.set(kid, createSecretKey(key));
    }
    this.currentKid = first.kid;
    this.#current = this.#keys.get(first.kid) as KeyObject;
  }

  /**
   * JSON-encodes `value` and seals it. `aad` (e.g. the session id) is bound into the protected
   * header as a digest, so the record opens only with the same `aad`: it cannot be moved to
   * another session. Promise API kept for callers; the work is `sealSync`.
   */
  seal(value: unknown, aad?: string): Promise<string> {
    return settled(() => this.sealSync(value, aad));
  }

  /**
   * `seal` without the promise. The compact JWE (RFC 7516 section 7.1) is built here with
   * node:crypto's synchronous AES-256-GCM (jose's WebCrypto path costs ~10x as much): header
   * `{alg: dir, enc: A256GCM, kid, sid?}` in that key order, an empty encrypted key, a random
   * 96-bit IV, and the header's base64url as the additional authenticated data.
   */
  sealSync(value: unknown, aad?: string): string {
    const json = JSON.stringify(value);
    if (json === undefined) throw new TypeError('cannot seal a value that has no JSON form');
    const header: { alg: 'dir'; enc: 'A256GCM'; kid: string; sid?: string } = {
      alg: 'dir',
      enc: 'A256GCM',
      kid: this.currentKid,
    };
    if (aad !== undefined) header[BINDING_HEADER] = bindingDigest(aad);
    const encodedHeader = Buffer.from(JSON.stringify(header), 'utf8').toString('base64url');
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', this.#current, iv, { authTagLength: TAG_BYTES });
    cipher.setAAD(Buffer.from(encodedHeader, 'ascii'));
    const ciphertext = Buffer.concat([cipher.update(json, 'utf8'), cipher.final()]);
    const tag = cipher.getAuthTag();
    return `${encodedHeader}..${iv.toString('base64url')}.${ciphertext.toString('base64url')}.${tag.toString('base64url')}`;
  }

  /** Opens a record sealed by `seal` with the same `aad`; any failure is a SealError. */
  open(jwe: string, aad?: string): Promise<unknown> {
    return settled(() => this.openSync(jwe, aad));
  }

  /**
   * `open` without the promise. Accepts what jose's compactDecrypt accepts for `dir`/`A256GCM`
   * (and what it sealed, so every existing record opens): five parts, an empty encrypted key, a
   * 96-bit IV, a 128-bit tag, no `crit` or `zip` header.
   */
  openSync(jwe: string, aad?: string): unknown {
    const parts = typeof jwe === 'string' ? jwe.split('.') : [];
    let header: Record<string, unknown>;
    try {
      // As jose's decodeProtectedHeader: a JWS or JWE shape, then the header; the rest is
      // checked once the key is known, so these failures read "failed to decrypt".
      if (parts.length !== 3 && parts.length !== 5) throw new TypeError('not a compact JWE');
      header = decodeHeader(parts[0] as string);
    } catch (cause) {
      throw new SealError('sealed record is malformed', { cause });
    }
    const kid = header.kid;
    if (typeof kid !== 'string') throw new SealError('sealed record names no key id');
    const key = this.#keys.get(kid);
    if (key === undefined) throw new SealingKeyUnknownError(safeKid(kid));

    let plaintext: Buffer;
    try {
      plaintext = decrypt(parts, header, key);
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
      return JSON.parse(UTF8.decode(plaintext)) as unknown;
    } catch {
      // No cause: a JSON parse error would quote the plaintext.
      throw new SealError(`sealed record (key id "${kid}") holds no valid JSON`, { kid });
    }
  }
}

/** A failure as a rejected promise, never a synchronous throw, as the async methods had. */
function settled<T>(run: () => T): Promise<T> {
  // A throw inside the executor rejects the promise.
  return new Promise((resolve) => resolve(run()));
}

const IV_BYTES = 12;
const TAG_BYTES = 16;
const BASE64URL_PART = /^[A-Za-z0-9_-]*$/;
/** jose reads a padded header too (it is authenticated as written, so padding cannot hide a change). */
const PADDED_BASE64URL_PART = /^[A-Za-z0-9_-]*={0,2}$/;
/** Fatal: a record whose plaintext is not UTF-8 is not ours, rather than a string with U+FFFD. */
const UTF8 = new TextDecoder('utf-8', { fatal: true });

/** base64url (unpadded, as JOSE writes it) to bytes; anything else throws. */
function decodePart(part: string, what: string, pattern = BASE64URL_PART): Buffer {
  if (!pattern.test(part) || part.replace(/=+$/, '').length % 4 === 1) {
    throw new TypeError(`${what} is not base64url`);
  }
  return Buffer.from(part, 'base64url');
}

/** The protected header as an object (unauthenticated until the record decrypts). */
function decodeHeader(encoded: string): Record<string, unknown> {
  if (encoded === '') throw new TypeError('the protected header is empty');
  const header: unknown = JSON.parse(
    UTF8.decode(decodePart(encoded, 'the protected header', PADDED_BASE64URL_PART)),
  );
  if (typeof header !== 'object' || header === null || Array.isArray(header)) {
    throw new TypeError('the protected header is not a JSON object');
  }
  return header as Record<string, unknown>;
}

/** Checks the record's shape and decrypts it; throws (with no plaintext in the error) otherwise. */
function decrypt(parts: string[], header: Record<string, unknown>, key: KeyObject): Buffer {
  if (parts.length !== 5) throw new TypeError('a compact JWE has five parts');
  const [encodedHeader, encryptedKey, encodedIv, encodedCiphertext, encodedTag] = parts as [
    string,
    string,
    string,
    string,
    string,
  ];
  if (header.alg !== 'dir') throw new TypeError('alg must be "dir"');
  if (header.enc !== 'A256GCM') throw new TypeError('enc must be "A256GCM"');
  if (header.crit !== undefined) throw new TypeError('no crit extension is understood');
  if (header.zip !== undefined) throw new TypeError('zip is not supported');
  if (encryptedKey !== '') throw new TypeError('alg "dir" has an empty encrypted key');
  const iv = decodePart(encodedIv, 'the IV');
  const ciphertext = decodePart(encodedCiphertext, 'the ciphertext');
  const tag = decodePart(encodedTag, 'the tag');
  if (iv.length !== IV_BYTES) throw new TypeError(`the IV must be ${IV_BYTES} bytes`);
  if (tag.length !== TAG_BYTES) throw new TypeError(`the tag must be ${TAG_BYTES} bytes`);
  const decipher = createDecipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  decipher.setAAD(Buffer.from(encodedHeader, 'ascii'));
  decipher.setAuthTag(tag);
  // final() throws when the tag does not match: nothing decrypted is returned before that.
  return Buffer.concat([decipher.update(ciphertext), decipher.final()]);
}

/** A digest, not the context itself, so the header does not spell out tenant and user. */
function bindingDigest(aad: string): string {
  return createHash('sha256').update(aad, 'utf8').digest('base64url');
}

/** A kid read from an unauthenticated header goes into an error message: keep it short and plain. */
function safeKid(kid: string): string {
  return kid.slice(0, 64).replace(/[^A-Za-z0-9._-]/g, '?');
}
