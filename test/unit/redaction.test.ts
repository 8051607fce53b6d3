import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../broker/config.js';
import { ConfigError } from '../../broker/errors.js';
import { Redactor, shapeRedactor } from '../../broker/redaction.js';

const SECRET = 'kq7-Zp!s3cret&value';
const b64 = (text: string): string => Buffer.from(text, 'utf8').toString('base64');
const b64url = (text: string): string => Buffer.from(text, 'utf8').toString('base64url');

describe('Redactor', () => {
  it('replaces a known secret in plain, URL-encoded, JSON-escaped, base64 and base64url forms', () => {
    const redactor = new Redactor([SECRET]);
    const forms = [
      SECRET,
      encodeURIComponent(SECRET),
      new URLSearchParams({ v: SECRET }).toString().slice(2),
      b64(SECRET),
      b64url(SECRET),
    ];
    for (const form of forms) {
      const out = redactor.redact(`the IdP said: ${form} (end)`);
      expect(out).not.toContain(form);
      expect(out).toContain('(end)');
    }
  });

  it('finds a secret inside a longer base64 value at any byte alignment', () => {
    const short = 'pa$$w0rd!x';
    const redactor = new Redactor([short]);
    for (const prefix of ['a', 'ab', 'abc', 'id:']) {
      for (const blob of [b64(`${prefix}${short}z`), b64url(`${prefix}${short}z`)]) {
        // Too short for the opaque-run shape: only the known secret's shifted forms catch it.
        expect(shapeRedactor.redact(`x ${blob} y`)).toContain(blob);
        expect(redactor.redact(`x ${blob} y`)).toContain('[redacted]');
      }
    }
  });

  it('replaces Authorization values, cookies, named secrets, JWTs and long opaque runs by shape', () => {
    const jwt = `eyJhbGciOiJSUzI1NiJ9.${b64url('{"sub":"alice"}')}.c2lnbmF0dXJl`;
    const cases: [string, string][] = [
      ['Authorization: Basic Y2xpZW50OnNlY3JldA==', 'Y2xpZW50OnNlY3JldA'],
      ['got "authorization":"Bearer abc.def-ghi"', 'abc.def-ghi'],
      ['cookie: session=s3ss10n; other=thing', 's3ss10n'],
      ['Set-Cookie: folioRefreshToken=rt-value; Path=/', 'rt-value'],
      ['client_secret=hunter2&grant_type=refresh_token', 'hunter2'],
      ['{"password": "pa55word"}', 'pa55word'],
      ['refresh_token=opaque-rt', 'opaque-rt'],
      [`token ${jwt} rejected`, 'eyJhbGciOiJSUzI1NiJ9'],
      ['opaque 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08', '9f86d081'],
      ['opaque Zm9vYmFyYmF6cXV4cXV1eHh5ejEyMzQ1Njc4OQ', 'Zm9vYmFyYmF6'],
    ];
    for (const [text, secret] of cases) expect(shapeRedactor.redact(text)).not.toContain(secret);
  });

  it('leaves ordinary words, setting names and paths alone', () => {
    const text =
      'TB_REFRESH_MIN_INTERVAL_MS must be at least 0, got "x"; /var/run/secrets/tokens/broker-token2 and invalid_grant';
    expect(shapeRedactor.redact(text)).toBe(text);
  });

  it('redacts before truncating, so a cut cannot expose the start of a secret', () => {
    const redactor = new Redactor([SECRET]);
    const out = redactor.redact(`${'x'.repeat(10)}${SECRET}${'y'.repeat(50)}`, { maxChars: 15 });
    expect(out).toBe(`${'x'.repeat(10)}[reda…`);
    expect(out).not.toContain(SECRET.slice(0, 3));
  });

  it('reads only the start of a huge text when the result is bounded', () => {
    const huge = `${SECRET} ${'word '.repeat(4_000_000)}`;
    const started = performance.now();
    const out = new Redactor([SECRET]).redact(huge, { maxChars: 200 });
    expect(performance.now() - started).toBeLessThan(1_000);
    expect(out.startsWith('[redacted] word')).toBe(true);
    expect(out.length).toBe(201);
  });

  it('adds per-call secrets with with() and keeps the configured ones', () => {
    const out = new Redactor([SECRET]).with('pw-12').redact(`${SECRET} pw-12`);
    expect(out).toBe('[redacted] [redacted]');
  });
});

describe('configuration errors', () => {
  it('name the variable but not a token pasted into it', () => {
    const jwt = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl';
    let error: unknown;
    try {
      loadConfig({
        TB_IDP_TOKEN_ENDPOINT: 'https://idp.example/token',
        TB_IDP_CLIENT_ID: 'token-broker',
        TB_IDP_CLIENT_SECRET: 'client-secret',
        TB_TLS: 'off',
        TB_AUTH: 'off',
        TB_RETRY_BASE_MS: jwt,
      });
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as ConfigError).setting).toBe('TB_RETRY_BASE_MS');
    expect((error as ConfigError).message).toContain('TB_RETRY_BASE_MS');
    expect((error as ConfigError).message).not.toContain('eyJhbGciOiJIUzI1NiJ9');
    expect((error as ConfigError).message).not.toContain('c2lnbmF0dXJl');
  });
});
