import { randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { decodeJwt } from 'jose';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

import {
  ServiceAccountVerifier,
  type VerifierSettings,
} from '../../broker/auth/service-account-verifier.js';
import { UnauthenticatedError, type UnauthenticatedReason } from '../../broker/errors.js';
import { K8sIssuer } from '../harness/k8s-issuer.js';

const ISSUER_BEARER = `reader-${randomUUID()}`;
const SA = { namespace: 'folio', serviceAccount: 'mod-data-import', podName: 'mod-di-5d9f-abcde' };

let now: number;
const clock = (): number => now;
let k8s: K8sIssuer;
let dir: string;
let bearerFile: string;
let logLines: string[];
/** Every secret a test handed out: none may show up in a log line or an error. */
let secrets: string[];
const verifiers: ServiceAccountVerifier[] = [];

beforeEach(async () => {
  now = Date.UTC(2030, 0, 1);
  k8s = await K8sIssuer.start({ bearerToken: ISSUER_BEARER, clock });
  dir = await mkdtemp(join(tmpdir(), 'tb-verifier-'));
  bearerFile = join(dir, 'issuer-token');
  await writeFile(bearerFile, `${ISSUER_BEARER}\n`);
  logLines = [];
  secrets = [ISSUER_BEARER];
});

afterEach(async () => {
  for (const v of verifiers.splice(0)) v.close();
  await k8s.close();
  await rm(dir, { recursive: true, force: true });
  for (const line of logLines) {
    for (const secret of secrets)
      expect(line.includes(secret), 'a log line holds a secret').toBe(false);
  }
});

function verifier(overrides: Partial<VerifierSettings> = {}): ServiceAccountVerifier {
  const settings: VerifierSettings = {
    issuer: k8s.issuer,
    audience: 'token-broker',
    discovery: true,
    jwksFile: undefined,
    issuerCaFile: k8s.ca.certFile,
    issuerTokenFile: bearerFile,
    ...overrides,
  };
  const log = pino({ level: 'debug' }, { write: (line: string) => void logLines.push(line) });
  const v = new ServiceAccountVerifier(settings, { log, clock });
  verifiers.push(v);
  return v;
}

async function started(overrides: Partial<VerifierSettings> = {}): Promise<ServiceAccountVerifier> {
  const v = verifier(overrides);
  await v.start();
  return v;
}

async function token(options: Parameters<K8sIssuer['sign']>[0] = SA): Promise<string> {
  const t = await k8s.sign(options);
  secrets.push(t);
  return t;
}

function remember(t: string): string {
  secrets.push(t);
  return t;
}

/** Asserts a refusal with `reason`, whose message and detail hold no part of `jwt`. */
async function expectRefused(
  call: Promise<unknown>,
  reason: UnauthenticatedReason,
  message: RegExp,
  jwt?: string,
): Promise<UnauthenticatedError> {
  const err = await call.then(
    () => {
      throw new Error(`expected a refusal (${reason}), got an identity`);
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UnauthenticatedError);
  const refusal = err as UnauthenticatedError;
  expect(refusal.code).toBe('UNAUTHENTICATED');
  expect(refusal.reason).toBe(reason);
  expect(refusal.message).toMatch(message);
  for (const part of (jwt ?? '').split('.').filter((p) => p.length > 8)) {
    expect(refusal.message.includes(part)).toBe(false);
    expect((refusal.detail ?? '').includes(part)).toBe(false);
  }
  return refusal;
}

/** The kids of the newest "loaded" line: what the verifier installed last. */
function loadedKids(): string[] | undefined {
  return logLines
    .map((l) => JSON.parse(l) as { msg: string; kids?: string[] })
    .filter((l) => l.msg === 'loaded the ServiceAccount issuer keys')
    .at(-1)?.kids;
}

function warnLines(): { url?: string; file?: string; problem?: string; msg: string }[] {
  return logLines
    .map((l) => JSON.parse(l) as { level: number; msg: string })
    .filter((l) => l.level === 40);
}

describe('ServiceAccountVerifier: identity', () => {
  it('names the caller of a valid projected token, with its pod and expiry', async () => {
    const v = await started();
    const t = await token();
    const claims = decodeJwt(t) as { exp: number; 'kubernetes.io': { pod: { uid: string } } };

    await expect(v.verify(`Bearer ${t}`)).resolves.toEqual({
      subject: 'folio/mod-data-import',
      namespace: 'folio',
      serviceAccount: 'mod-data-import',
      podName: 'mod-di-5d9f-abcde',
      podUid: claims['kubernetes.io'].pod.uid,
      expiresAt: claims.exp * 1000,
    });
  });

  it('accepts a token not bound to a pod, any case of "Bearer", and an audience list', async () => {
    const v = await started();
    const t = await token({
      namespace: 'ops',
      serviceAccount: 'tbctl',
      audience: ['other', 'token-broker'],
    });

    const who = await v.verify(`bearer  ${t}`);
    expect(who).toMatchObject({ subject: 'ops/tbctl', podName: undefined, podUid: undefined });
  });

  it('allows the leeway on exp and nbf, and no more', async () => {
    const v = await started({ leewayMs: 30_000 });
    const justExpired = await token({ ...SA, expiresInS: -20 });
    const almostValid = await token({ ...SA, notBeforeS: 20 });
    await expect(v.verify(`Bearer ${justExpired}`)).resolves.toMatchObject({ namespace: 'folio' });
    await expect(v.verify(`Bearer ${almostValid}`)).resolves.toMatchObject({ namespace: 'folio' });

    const expired = await token({ ...SA, expiresInS: -40 });
    await expectRefused(v.verify(`Bearer ${expired}`), 'expired', /has expired/, expired);
  });
});

describe('ServiceAccountVerifier: refusals', () => {
  it('refuses a missing, non-Bearer or garbage authorization', async () => {
    const v = await started();
    await expectRefused(v.verify(undefined), 'missing', /no authorization metadata/);
    await expectRefused(v.verify('  '), 'missing', /no authorization metadata/);
    const basic = remember(`Basic ${Buffer.from('user:pass-word-secret').toString('base64')}`);
    await expectRefused(v.verify(basic), 'malformed', /not a Bearer token/, basic.slice(6));
    await expectRefused(v.verify('Bearer'), 'malformed', /not a Bearer token/);
    const garbage = remember('not-a-jwt-at-all-but-long');
    await expectRefused(
      v.verify(`Bearer ${garbage}`),
      'malformed',
      /not a well-formed JWT/,
      garbage,
    );
    const noKid = remember(
      `${Buffer.from('{"alg":"RS256"}').toString('base64url')}.${Buffer.from('{}').toString('base64url')}.c2ln`,
    );
    await expectRefused(v.verify(`Bearer ${noKid}`), 'malformed', /names no key id/);
    await expectRefused(v.verify(`Bearer ${'a'.repeat(20_000)}`), 'malformed', /longer than/);
  });

  it('refuses expired and not-yet-valid tokens', async () => {
    const v = await started();
    const expired = await token({ ...SA, expiresInS: -3600 });
    await expectRefused(
      v.verify(`Bearer ${expired}`),
      'expired',
      /^the bearer token has expired$/,
      expired,
    );
    const early = await token({ ...SA, notBeforeS: 600 });
    await expectRefused(v.verify(`Bearer ${early}`), 'not-yet-valid', /not valid yet/, early);
  });

  it('refuses a wrong audience or issuer, naming only the expected one', async () => {
    const v = await started();
    const otherAud = await token({ ...SA, audience: 'vault' });
    const refusal = await expectRefused(
      v.verify(`Bearer ${otherAud}`),
      'wrong-audience',
      /^the bearer token's audience is not token-broker$/,
      otherAud,
    );
    expect(refusal.message).not.toContain('vault');

    // Signed with a published key, so this one gets to the signature check and fails on iss.
    const otherIss = await token({ ...SA, issuer: 'https://evil.example' });
    await expectRefused(
      v.verify(`Bearer ${otherIss}`),
      'wrong-issuer',
      new RegExp(`issuer is not ${k8s.issuer.replace(/[.]/g, '\\.')}$`),
      otherIss,
    );
  });

  it('refuses an unknown kid, alg none, HS256 keyed with the public key, and a forged signature', async () => {
    const v = await started();
    const checksBefore = v.counters.signatureChecks;

    const unknownKid = await token({ ...SA, kid: 'no-such-key' });
    await expectRefused(
      v.verify(`Bearer ${unknownKid}`),
      'unknown-key',
      /does not publish/,
      unknownKid,
    );

    const none = remember(k8s.forgeAlgNone(SA));
    await expectRefused(
      v.verify(`Bearer ${none}`),
      'bad-algorithm',
      /algorithm none is not allowed/,
      none,
    );

    const hs = remember(await k8s.forgeHs256WithPublicKey(SA));
    await expectRefused(v.verify(`Bearer ${hs}`), 'bad-algorithm', /HS256 is not allowed/, hs);
    // Neither reached a signature check: the algorithm alone decided.
    expect(v.counters.signatureChecks).toBe(checksBefore);

    const forged = remember(await k8s.forgeWithForeignKey(SA));
    await expectRefused(
      v.verify(`Bearer ${forged}`),
      'bad-signature',
      /signature does not verify/,
      forged,
    );
  });

  it('refuses an algorithm that does not fit the key it names', async () => {
    const v = await started();
    const rsaKid = k8s.currentKid;
    await k8s.rotateKey({ alg: 'ES256' });
    // An ES256 signature claiming the RSA key's kid.
    const mismatched = await token({ ...SA, kid: rsaKid });
    await expectRefused(
      v.verify(`Bearer ${mismatched}`),
      'bad-algorithm',
      /does not fit its signing key/,
      mismatched,
    );
  });

  it('refuses a token whose sub disagrees with its kubernetes.io claims', async () => {
    const v = await started();
    const wrongSub = await token({ ...SA, sub: 'system:serviceaccount:folio:admin' });
    await expectRefused(
      v.verify(`Bearer ${wrongSub}`),
      'not-a-service-account',
      /not a Kubernetes ServiceAccount token/,
      wrongSub,
    );
    const userSub = await token({ ...SA, sub: 'alice' });
    await expectRefused(
      v.verify(`Bearer ${userSub}`),
      'not-a-service-account',
      /ServiceAccount/,
      userSub,
    );
    const badNs = await token({ namespace: 'Folio/x', serviceAccount: 'mod-x' });
    await expectRefused(
      v.verify(`Bearer ${badNs}`),
      'not-a-service-account',
      /ServiceAccount/,
      badNs,
    );
  });
});

describe('ServiceAccountVerifier: keys', () => {
  it('accepts a token of a rotated-in key at once, with one refetch, and keeps the old key', async () => {
    const v = await started();
    const old = await token({ ...SA, podName: 'mod-di-old' });
    const fetched = k8s.counters.jwks;

    await k8s.rotateKey({ alg: 'ES256' });
    const fresh = await token({ ...SA, podName: 'mod-di-new' });
    await expect(v.verify(`Bearer ${fresh}`)).resolves.toMatchObject({ podName: 'mod-di-new' });
    expect(k8s.counters.jwks).toBe(fetched + 1);

    // Never verified before, so this needs the old key itself, not the cache.
    await expect(v.verify(`Bearer ${old}`)).resolves.toMatchObject({ podName: 'mod-di-old' });
    expect(k8s.counters.jwks).toBe(fetched + 1);
    expect(v.counters.cacheHits).toBe(0);
  });

  it('bounds refetches for random kids: one shared fetch, then a cooldown', async () => {
    const v = await started({ unknownKidCooldownMs: 10_000 });
    const fetched = k8s.counters.jwks;

    const burst = await Promise.all(
      Array.from({ length: 20 }, () => token({ ...SA, kid: randomUUID() })),
    );
    const results = await Promise.allSettled(burst.map((t) => v.verify(`Bearer ${t}`)));
    expect(results.every((r) => r.status === 'rejected')).toBe(true);
    expect(k8s.counters.jwks).toBe(fetched + 1);

    for (let i = 0; i < 20; i++) {
      const t = await token({ ...SA, kid: randomUUID() });
      await expectRefused(v.verify(`Bearer ${t}`), 'unknown-key', /does not publish/, t);
    }
    expect(k8s.counters.jwks).toBe(fetched + 1);

    // A token of another issuer never causes a fetch, cooldown or not.
    now += 10_001;
    const foreign = await token({ ...SA, kid: randomUUID(), issuer: 'https://other.example' });
    await expectRefused(v.verify(`Bearer ${foreign}`), 'wrong-issuer', /issuer is not/, foreign);
    expect(k8s.counters.jwks).toBe(fetched + 1);

    // After the cooldown one more unknown kid may fetch again.
    const later = await token({ ...SA, kid: randomUUID() });
    await expectRefused(v.verify(`Bearer ${later}`), 'unknown-key', /does not publish/, later);
    expect(k8s.counters.jwks).toBe(fetched + 2);
  });

  it('drops removed keys on the periodic refresh, cached tokens included', async () => {
    const v = await started({ refreshIntervalMs: 100 });
    const old = await token();
    await v.verify(`Bearer ${old}`);
    await v.verify(`Bearer ${old}`);
    expect(v.counters.cacheHits).toBe(1);

    const kid = await k8s.rotateKey({ dropOld: true });
    await vi.waitFor(() => expect(loadedKids()).toEqual([kid]), { timeout: 5_000 });
    await expectRefused(v.verify(`Bearer ${old}`), 'unknown-key', /does not publish/, old);
  });

  it('sends the issuer bearer from its file, re-read at every fetch', async () => {
    const v = await started({ unknownKidCooldownMs: 1_000 });
    expect(k8s.counters.unauthorized).toBe(0);
    await expect(v.verify(`Bearer ${await token()}`)).resolves.toBeDefined();

    const second = `reader-${randomUUID()}`;
    secrets.push(second);
    k8s.requireBearer(second);
    await k8s.rotateKey();
    const fresh = await token();
    await expectRefused(
      v.verify(`Bearer ${fresh}`),
      'keys-unavailable',
      /could not be loaded/,
      fresh,
    );
    expect(k8s.counters.unauthorized).toBe(1);
    const warn = warnLines().at(-1)!;
    expect(warn.url).toBe(`${k8s.issuer}/.well-known/openid-configuration`);
    expect(warn.problem).toBe('answered HTTP 401');

    await writeFile(bearerFile, second);
    now += 1_001;
    await expect(v.verify(`Bearer ${fresh}`)).resolves.toMatchObject({ namespace: 'folio' });
  });

  it('starts without keys when the issuer is down, says so, and recovers by itself', async () => {
    k8s.setUnavailable(true);
    const v = await started();
    const t = await token();
    await expectRefused(v.verify(`Bearer ${t}`), 'keys-unavailable', /could not be loaded/, t);
    expect(warnLines()[0]).toMatchObject({
      url: `${k8s.issuer}/.well-known/openid-configuration`,
      problem: 'answered HTTP 503',
      msg: expect.stringMatching(/cannot be verified yet/) as unknown,
    });

    k8s.setUnavailable(false);
    // The background retry (1 s after the failed start) loads the keys; the clock stays frozen
    // so the cooldown cannot be what lets the next verify fetch.
    await vi.waitFor(() => expect(k8s.counters.jwks).toBe(1), { timeout: 5_000 });
    await expect(v.verify(`Bearer ${t}`)).resolves.toMatchObject({ namespace: 'folio' });
  });

  it('refuses an issuer whose certificate it does not trust', async () => {
    const v = await started({ issuerCaFile: undefined });
    const t = await token();
    await expectRefused(v.verify(`Bearer ${t}`), 'keys-unavailable', /could not be loaded/, t);
    expect(warnLines()[0]?.problem).toMatch(/certificate/);
    expect(k8s.counters.discovery).toBe(0);
  });

  it('reads a JWKS file and follows a Secret-style ..data symlink swap', async () => {
    // The layout kubelet makes: jwks.json -> ..data/jwks.json, ..data -> ..v1 (swapped atomically).
    const mount = join(dir, 'mount');
    await mkdir(join(mount, '..v1'), { recursive: true });
    await writeFile(join(mount, '..v1', 'jwks.json'), JSON.stringify(k8s.jwks()));
    await symlink('..v1', join(mount, '..data'));
    await symlink(join('..data', 'jwks.json'), join(mount, 'jwks.json'));
    const swapTo = async (version: string): Promise<void> => {
      await mkdir(join(mount, version));
      await writeFile(join(mount, version, 'jwks.json'), JSON.stringify(k8s.jwks()));
      await symlink(version, join(mount, '..data_tmp'));
      await rename(join(mount, '..data_tmp'), join(mount, '..data'));
    };

    const v = await started({
      discovery: false,
      jwksFile: join(mount, 'jwks.json'),
      issuerCaFile: undefined,
      issuerTokenFile: undefined,
      fileCheckIntervalMs: 50,
    });
    const old = await token();
    await expect(v.verify(`Bearer ${old}`)).resolves.toMatchObject({ namespace: 'folio' });
    expect(k8s.counters.discovery + k8s.counters.jwks).toBe(0);

    // A new key in the file is found at once for a token naming it.
    await k8s.rotateKey();
    await swapTo('..v2');
    const fresh = await token();
    await expect(v.verify(`Bearer ${fresh}`)).resolves.toMatchObject({ namespace: 'folio' });

    // Dropping the old key is seen by the file watch alone, without any token asking.
    const kid = await k8s.rotateKey({ dropOld: true });
    await swapTo('..v3');
    await vi.waitFor(() => expect(loadedKids()).toEqual([kid]), { timeout: 5_000 });
    now += 60_000; // past any cooldown: the refusal below is the new file's, not a skipped fetch
    await expectRefused(v.verify(`Bearer ${old}`), 'unknown-key', /does not publish/, old);

    // A broken file is refused with a warning naming it; the last good keys stay.
    await writeFile(join(mount, '..v3', 'jwks.json'), '{"keys": [');
    const newest = await token();
    await vi.waitFor(
      () => expect(warnLines().some((l) => l.problem === 'is not valid JSON')).toBe(true),
      {
        timeout: 5_000,
      },
    );
    expect(warnLines().find((l) => l.problem === 'is not valid JSON')?.file).toBe(
      join(mount, 'jwks.json'),
    );
    await expect(v.verify(`Bearer ${newest}`)).resolves.toMatchObject({ namespace: 'folio' });
  });
});

describe('ServiceAccountVerifier: cache', () => {
  it('answers a repeated token without a signature check, until it expires', async () => {
    const v = await started({ leewayMs: 0 });
    const t = await token({ ...SA, expiresInS: 600 });
    const first = await v.verify(`Bearer ${t}`);
    const second = await v.verify(`Bearer ${t}`);
    expect(second).toEqual(first);
    expect(v.counters).toMatchObject({ signatureChecks: 1, cacheHits: 1 });

    now += 599_000;
    await v.verify(`Bearer ${t}`);
    expect(v.counters).toMatchObject({ signatureChecks: 1, cacheHits: 2 });

    now += 1_000;
    await expectRefused(v.verify(`Bearer ${t}`), 'expired', /has expired/, t);
    await expectRefused(v.verify(`Bearer ${t}`), 'expired', /has expired/, t);
    // Both went to the signature check: the expired entry was dropped, not served.
    expect(v.counters).toMatchObject({ signatureChecks: 3, cacheHits: 2 });
  });

  it('holds at most cacheMaxEntries tokens, evicting the oldest', async () => {
    const v = await started({ cacheMaxEntries: 2 });
    const [a, b, c] = await Promise.all([token(), token(), token()]);
    for (const t of [a, b, c]) await v.verify(`Bearer ${t}`);
    expect(v.counters.signatureChecks).toBe(3);

    await v.verify(`Bearer ${c}`);
    expect(v.counters).toMatchObject({ signatureChecks: 3, cacheHits: 1 });
    await v.verify(`Bearer ${a}`);
    expect(v.counters).toMatchObject({ signatureChecks: 4, cacheHits: 1 });
  });

  it('never caches a refusal', async () => {
    const v = await started();
    const t = await token({ ...SA, audience: 'vault' });
    await expectRefused(v.verify(`Bearer ${t}`), 'wrong-audience', /audience/, t);
    await expectRefused(v.verify(`Bearer ${t}`), 'wrong-audience', /audience/, t);
    expect(v.counters).toMatchObject({ signatureChecks: 2, cacheHits: 0 });
  });
});
