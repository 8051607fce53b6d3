/**
 * Names the caller of a gRPC call from its `authorization: Bearer <JWT>` metadata: a Kubernetes
 * projected ServiceAccount token, verified offline against the cluster issuer's published keys.
 *
 * Keys come from OIDC discovery (`<issuer>/.well-known/openid-configuration` -> `jwks_uri`, over
 * HTTPS trusting `issuerCaFile`, with `issuerTokenFile` as bearer) or from a local JWKS file.
 * They are refreshed periodically (so removed keys stop working), when the file changes, and
 * once at once for a token naming an unknown `kid` (so a key rotation needs no restart). Those
 * kid-driven refetches are bounded: one in flight, shared, then a cooldown after a miss, so
 * random kids cannot make the broker hammer the API server.
 *
 * A verified token is cached by its SHA-256 until it expires, so a repeated call costs no
 * signature check. Tokens never reach a log line or an error message.
 */
import { createHash } from 'node:crypto';
import { unwatchFile, watchFile, type Stats } from 'node:fs';
import { readFile } from 'node:fs/promises';

import {
  decodeJwt,
  decodeProtectedHeader,
  errors as joseErrors,
  importJWK,
  jwtVerify,
  type CryptoKey,
  type JWK,
  type JWTPayload,
  type ProtectedHeaderParameters,
} from 'jose';
import type { Logger } from 'pino';
import { https } from '../../shared/node-http.js';

import { UnauthenticatedError, type UnauthenticatedReason } from '../errors.js';

export interface CallerIdentity {
  /** `namespace/serviceaccount`, what the access policy matches. */
  subject: string;
  namespace: string;
  serviceAccount: string;
  podName: string | undefined;
  podUid: string | undefined;
  /** The token's `exp`, epoch ms. */
  expiresAt: number;
}

export interface VerifierSettings {
  issuer: string;
  audience: string;
  /** true: fetch <issuer>/.well-known/openid-configuration to find jwks_uri. */
  discovery: boolean;
  jwksFile: string | undefined;
  issuerCaFile: string | undefined;
  issuerTokenFile: string | undefined;
  /** Clock skew allowed on exp and nbf (default 30 s). */
  leewayMs?: number;
  /** Periodic key refresh (default 5 min). */
  refreshIntervalMs?: number;
  /** No kid-driven refetch this long after one that did not find the kid (default 10 s). */
  unknownKidCooldownMs?: number;
  /** Verified tokens remembered (default 10,000; the oldest is evicted). */
  cacheMaxEntries?: number;
  /** One discovery or JWKS request (default 10 s). */
  fetchTimeoutMs?: number;
  /** How often the JWKS file is stat'ed for a change (default 1 s). */
  fileCheckIntervalMs?: number;
}

export interface VerifierCounters {
  /** Tokens that reached a signature check (cache misses that got that far). */
  signatureChecks: number;
  /** verify() calls answered from the cache. */
  cacheHits: number;
  /** Key set loads attempted (fetches or file reads), whatever started them. */
  keyLoads: number;
  keyLoadFailures: number;
}

const DEFAULTS = {
  leewayMs: 30_000,
  refreshIntervalMs: 5 * 60_000,
  unknownKidCooldownMs: 10_000,
  cacheMaxEntries: 10_000,
  fetchTimeoutMs: 10_000,
  fileCheckIntervalMs: 1_000,
} as const;

const DISCOVERY_PATH = '/.well-known/openid-configuration';
/** Real ServiceAccount tokens are ~1 KiB; anything far larger is not one (and not worth hashing). */
const MAX_TOKEN_LENGTH = 16 * 1024;
const MAX_RESPONSE_BYTES = 1024 * 1024;
const FIRST_RETRY_MS = 1_000;
const MAX_RETRY_MS = 30_000;

const ASYMMETRIC_ALGS: ReadonlySet<string> = new Set([
  'RS256',
  'RS384',
  'RS512',
  'PS256',
  'PS384',
  'PS512',
  'ES256',
  'ES384',
  'ES512',
  'EdDSA',
  'Ed25519',
]);
const EC_ALG_BY_CURVE: Readonly<Record<string, string>> = {
  'P-256': 'ES256',
  'P-384': 'ES384',
  'P-521': 'ES512',
};
/** Public members per key type: a key is imported from these only, never from private parts. */
const PUBLIC_MEMBERS: Readonly<Record<string, readonly string[]>> = {
  RSA: ['kty', 'n', 'e'],
  EC: ['kty', 'crv', 'x', 'y'],
  OKP: ['kty', 'crv', 'x'],
};
// Kubernetes names: a namespace is a DNS label, a ServiceAccount a DNS subdomain. Holding tokens
// to them keeps `ns/sa` unambiguous for the policy's globs.
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
const DNS_SUBDOMAIN =
  /^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
/** An attacker-chosen header value is shown only when it is plainly an algorithm name. */
const PRINTABLE_ALG = /^[A-Za-z0-9]{1,16}$/;

interface LoadedKey {
  readonly key: CryptoKey;
  /** The algorithms this key may verify: the one its type implies (or its JWK `alg`). */
  readonly algorithms: ReadonlySet<string>;
  /** Canonical public members, to see whether a kid now names different key material. */
  readonly fingerprint: string;
}

interface CacheEntry {
  readonly identity: CallerIdentity;
  readonly expS: number;
  readonly kid: string;
}

/** A key set could not be loaded from `source` (a URL or file path; never carries a secret). */
class KeyLoadError extends Error {
  constructor(
    readonly source: string,
    message: string,
  ) {
    super(message);
  }
}

function refuse(reason: UnauthenticatedReason, message: string, detail?: string): never {
  throw new UnauthenticatedError(reason, message, detail === undefined ? undefined : { detail });
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function bearerToken(authorization: string | undefined): string {
  if (authorization === undefined || authorization.trim() === '') {
    refuse('missing', 'the call carries no authorization metadata (expected "Bearer <token>")');
  }
  const match = /^\s*bearer +(\S+)\s*$/i.exec(authorization);
  if (match === null) refuse('malformed', 'the authorization metadata is not a Bearer token');
  const token = match[1]!;
  if (token.length > MAX_TOKEN_LENGTH) {
    refuse('malformed', `the bearer token is longer than ${MAX_TOKEN_LENGTH} characters`);
  }
  return token;
}

function sha256(value: string): string {
  return createHash('sha256').update(value).digest('base64url');
}

/** The algorithms a JWK may verify, or why it is unusable. */
function algorithmsFor(jwk: Record<string, unknown>): ReadonlySet<string> | string {
  const declared = typeof jwk.alg === 'string' ? jwk.alg : undefined;
  if (declared !== undefined && !ASYMMETRIC_ALGS.has(declared)) {
    return `alg ${PRINTABLE_ALG.test(declared) ? declared : '(unprintable)'} is not an asymmetric signature algorithm`;
  }
  switch (jwk.kty) {
    case 'RSA':
      if (declared !== undefined && !/^(RS|PS)/.test(declared))
        return 'alg does not fit an RSA key';
      return new Set([declared ?? 'RS256']);
    case 'EC': {
      const crv = typeof jwk.crv === 'string' ? jwk.crv : '';
      const alg = EC_ALG_BY_CURVE[crv];
      if (alg === undefined) return 'the EC curve is not P-256, P-384 or P-521';
      if (declared !== undefined && declared !== alg) return `alg does not fit curve ${crv}`;
      return new Set([alg]);
    }
    case 'OKP':
      if (jwk.crv !== 'Ed25519') return 'the OKP curve is not Ed25519';
      if (declared !== undefined && declared !== 'EdDSA' && declared !== 'Ed25519') {
        return 'alg does not fit an Ed25519 key';
      }
      return new Set(declared !== undefined ? [declared] : ['EdDSA', 'Ed25519']);
    default:
      return 'the key type is not RSA, EC or OKP (symmetric keys are never accepted)';
  }
}

function identityOf(payload: JWTPayload): CallerIdentity | undefined {
  const k8s = payload['kubernetes.io'];
  if (!isRecord(k8s)) return undefined;
  const namespace = k8s.namespace;
  const serviceAccount = isRecord(k8s.serviceaccount) ? k8s.serviceaccount.name : undefined;
  if (typeof namespace !== 'string' || !DNS_LABEL.test(namespace)) return undefined;
  if (typeof serviceAccount !== 'string' || !DNS_SUBDOMAIN.test(serviceAccount)) return undefined;
  if (payload.sub !== `system:serviceaccount:${namespace}:${serviceAccount}`) return undefined;
  const pod = isRecord(k8s.pod) ? k8s.pod : {};
  const text = (value: unknown): string | undefined =>
    typeof value === 'string' && value.length > 0 && value.length <= 253 ? value : undefined;
  return {
    subject: `${namespace}/${serviceAccount}`,
    namespace,
    serviceAccount,
    podName: text(pod.name),
    podUid: text(pod.uid),
    expiresAt: payload.exp! * 1000,
  };
}

/** GET an HTTPS URL and parse its JSON answer, bounded in time and size. */
function fetchJson(
  url: URL,
  options: { ca: string | undefined; bearer: string | undefined; timeoutMs: number },
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const fail = (message: string): void => reject(new KeyLoadError(url.href, message));
    const req = https.request(
      url,
      {
        method: 'GET',
        // A fresh connection per fetch: fetches are rare and the CA file may have changed.
        agent: false,
        ...(options.ca === undefined ? {} : { ca: options.ca }),
        headers: {
          accept: 'application/json',
          ...(options.bearer === undefined ? {} : { authorization: `Bearer ${options.bearer}` }),
        },
      },
      (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          fail(`answered HTTP ${res.statusCode ?? 'without a status'}`);
          return;
        }
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > MAX_RESPONSE_BYTES) req.destroy(new Error('the answer exceeds 1 MiB'));
          else chunks.push(chunk);
        });
        res.on('end', () => {
          try {
            resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
          } catch {
            fail('the answer is not JSON');
          }
        });
        res.on('error', (err) => fail(err.message));
      },
    );
    const timer = setTimeout(
      () => req.destroy(new Error(`no answer within ${options.timeoutMs} ms`)),
      options.timeoutMs,
    );
    req.on('close', () => clearTimeout(timer));
    req.on('error', (err) => fail(err.message));
    req.end();
  });
}

export class ServiceAccountVerifier {
  private readonly log: Logger;
  private readonly clock: () => number;
  private readonly tuning: Required<Pick<VerifierSettings, keyof typeof DEFAULTS>>;
  private readonly counts: VerifierCounters = {
    signatureChecks: 0,
    cacheHits: 0,
    keyLoads: 0,
    keyLoadFailures: 0,
  };
  /** undefined until the first successful load. */
  private keys: ReadonlyMap<string, LoadedKey> | undefined;
  private lastLoadFailed = false;
  private loading: Promise<void> | undefined;
  private kidRefetchNotBefore = 0;
  private readonly cache = new Map<string, CacheEntry>();
  private refreshTimer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private retryDelayMs = FIRST_RETRY_MS;
  private fileListener: ((curr: Stats, prev: Stats) => void) | undefined;
  private started = false;
  private closed = false;

  constructor(
    private readonly settings: VerifierSettings,
    deps: { log: Logger; clock?: () => number },
  ) {
    this.log = deps.log;
    this.clock = deps.clock ?? Date.now;
    this.tuning = {
      leewayMs: settings.leewayMs ?? DEFAULTS.leewayMs,
      refreshIntervalMs: settings.refreshIntervalMs ?? DEFAULTS.refreshIntervalMs,
      unknownKidCooldownMs: settings.unknownKidCooldownMs ?? DEFAULTS.unknownKidCooldownMs,
      cacheMaxEntries: settings.cacheMaxEntries ?? DEFAULTS.cacheMaxEntries,
      fetchTimeoutMs: settings.fetchTimeoutMs ?? DEFAULTS.fetchTimeoutMs,
      fileCheckIntervalMs: settings.fileCheckIntervalMs ?? DEFAULTS.fileCheckIntervalMs,
    };
  }

  /** A snapshot of what the verifier has done, for metrics and tests. */
  get counters(): Readonly<VerifierCounters> {
    return { ...this.counts };
  }

  /** Loads the keys once; a failure is logged and retried with backoff, never thrown. */
  async start(): Promise<void> {
    if (this.started || this.closed) return;
    this.started = true;
    const file = this.settings.jwksFile;
    if (file !== undefined) {
      // Stat polling follows symlinks, so a Secret mount's `..data` swap is seen as a change.
      this.fileListener = (curr, prev) => {
        if (curr.mtimeMs !== prev.mtimeMs || curr.ino !== prev.ino || curr.size !== prev.size) {
          void this.reload();
        }
      };
      watchFile(
        file,
        { interval: this.tuning.fileCheckIntervalMs, persistent: false },
        this.fileListener,
      );
    }
    this.refreshTimer = setInterval(() => void this.reload(), this.tuning.refreshIntervalMs);
    this.refreshTimer.unref();
    await this.reload();
    if (this.keys === undefined) this.scheduleRetry();
  }

  close(): void {
    this.closed = true;
    clearInterval(this.refreshTimer);
    clearTimeout(this.retryTimer);
    if (this.fileListener !== undefined && this.settings.jwksFile !== undefined) {
      unwatchFile(this.settings.jwksFile, this.fileListener);
    }
  }

  /** The caller named by `authorization`; throws UnauthenticatedError saying what was wrong. */
  /**
   * The caller of a token verified before and not yet expired, answered synchronously (the hot
   * path of every call); undefined when it must go through verify().
   */
  verifyCached(authorization: string | undefined): CallerIdentity | undefined {
    if (authorization === undefined || !authorization.startsWith('Bearer ')) return undefined;
    return this.fromCache(sha256(authorization.slice(7).trim()));
  }

  async verify(authorization: string | undefined): Promise<CallerIdentity> {
    const token = bearerToken(authorization);
    const hash = sha256(token);
    const known = this.fromCache(hash);
    if (known) return known;
    const { identity, kid, key, expS } = await this.verifyUncached(token);
    // Keys may have been replaced while the signature was checked: cache only under a live key.
    if (this.keys?.get(kid) !== key) return identity;
    if (this.cache.size >= this.tuning.cacheMaxEntries) {
      const oldest = this.cache.keys().next();
      if (oldest.done !== true) this.cache.delete(oldest.value);
    }
    this.cache.set(hash, { identity, kid, expS });
    return identity;
  }

  /** A cached, unexpired caller; an expired entry is dropped, so verifying again says "expired". */
  private fromCache(hash: string): CallerIdentity | undefined {
    const cached = this.cache.get(hash);
    if (cached === undefined) return undefined;
    if (cached.expS <= this.nowS() - this.leewayS()) {
      this.cache.delete(hash);
      return undefined;
    }
    this.counts.cacheHits++;
    return cached.identity;
  }

  private nowS(): number {
    return Math.floor(this.clock() / 1000);
  }

  private leewayS(): number {
    return this.tuning.leewayMs / 1000;
  }

  private async verifyUncached(
    token: string,
  ): Promise<{ identity: CallerIdentity; kid: string; key: LoadedKey; expS: number }> {
    let header: ProtectedHeaderParameters;
    let unverified: JWTPayload;
    try {
      header = decodeProtectedHeader(token);
      unverified = decodeJwt(token);
    } catch {
      refuse('malformed', 'the bearer token is not a well-formed JWT');
    }
    const { alg, kid } = header;
    if (typeof alg !== 'string' || !ASYMMETRIC_ALGS.has(alg)) {
      const shown = typeof alg === 'string' && PRINTABLE_ALG.test(alg) ? ` ${alg}` : '';
      refuse(
        'bad-algorithm',
        `the bearer token's algorithm${shown} is not allowed (only asymmetric signatures are)`,
      );
    }
    if (typeof kid !== 'string' || kid === '') {
      refuse('malformed', "the bearer token's header names no key id (kid)");
    }
    const key = await this.keyFor(kid, unverified.iss);
    if (!key.algorithms.has(alg)) {
      refuse('bad-algorithm', `the bearer token's algorithm ${alg} does not fit its signing key`);
    }
    this.counts.signatureChecks++;
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, key.key, {
        algorithms: [alg],
        issuer: this.settings.issuer,
        audience: this.settings.audience,
        clockTolerance: this.leewayS(),
        currentDate: new Date(this.clock()),
        requiredClaims: ['exp'],
      }));
    } catch (err) {
      throw this.fromJose(err);
    }
    const identity = identityOf(payload);
    if (identity === undefined) {
      refuse(
        'not-a-service-account',
        'the bearer token is not a Kubernetes ServiceAccount token (kubernetes.io namespace and ' +
          'serviceaccount name missing or invalid, or sub does not match them)',
      );
    }
    return { identity, kid, key, expS: payload.exp! };
  }

  private fromJose(err: unknown): UnauthenticatedError {
    const detail =
      err instanceof Error
        ? `${(err as { code?: string }).code ?? err.name}: ${err.message}`
        : String(err);
    const make = (reason: UnauthenticatedReason, message: string): UnauthenticatedError =>
      new UnauthenticatedError(reason, message, { detail });
    if (err instanceof joseErrors.JWTExpired)
      return make('expired', 'the bearer token has expired');
    if (err instanceof joseErrors.JWTClaimValidationFailed) {
      if (err.reason === 'check_failed' || err.reason === 'missing') {
        switch (err.claim) {
          case 'nbf':
            return make(
              'not-yet-valid',
              'the bearer token is not valid yet (nbf is in the future)',
            );
          case 'aud':
            return make(
              'wrong-audience',
              `the bearer token's audience is not ${this.settings.audience}`,
            );
          case 'iss':
            return make('wrong-issuer', `the bearer token's issuer is not ${this.settings.issuer}`);
          case 'exp':
            return make('malformed', 'the bearer token has no expiry (exp)');
        }
      }
      return make('malformed', `the bearer token's ${err.claim} claim is invalid`);
    }
    if (err instanceof joseErrors.JOSEAlgNotAllowed) {
      return make('bad-algorithm', "the bearer token's algorithm is not allowed");
    }
    if (err instanceof joseErrors.JWSSignatureVerificationFailed) {
      return make('bad-signature', "the bearer token's signature does not verify");
    }
    if (err instanceof joseErrors.JWSInvalid || err instanceof joseErrors.JWTInvalid) {
      return make('malformed', 'the bearer token is not a well-formed JWT');
    }
    return make('bad-signature', "the bearer token's signature could not be checked");
  }

  private async keyFor(kid: string, unverifiedIssuer: string | undefined): Promise<LoadedKey> {
    const known = this.keys?.get(kid);
    if (known !== undefined) return known;
    // A token of another issuer can never be signed by our keys: no reason to refetch for it.
    if (unverifiedIssuer !== this.settings.issuer) {
      refuse('wrong-issuer', `the bearer token's issuer is not ${this.settings.issuer}`);
    }
    await this.refetchFor(kid);
    const found = this.keys?.get(kid);
    if (found !== undefined) return found;
    if (this.keys === undefined || this.lastLoadFailed) {
      refuse(
        'keys-unavailable',
        "the issuer's signing keys could not be loaded, so the bearer token cannot be verified",
      );
    }
    refuse('unknown-key', 'the bearer token is signed with a key the issuer does not publish');
  }

  /**
   * One refetch for an unknown kid: joins a load already in flight, else starts one unless a
   * recent refetch missed (cooldown). The first miss after a quiet spell fetches at once.
   */
  private async refetchFor(kid: string): Promise<void> {
    if (this.loading === undefined && this.clock() < this.kidRefetchNotBefore) return;
    await this.reload();
    if (this.keys?.has(kid) !== true) {
      this.kidRefetchNotBefore = this.clock() + this.tuning.unknownKidCooldownMs;
    }
  }

  /** Shares one load among all who ask while it runs. */
  private reload(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.loading ??= this.load().finally(() => {
      this.loading = undefined;
    });
    return this.loading;
  }

  private scheduleRetry(): void {
    if (this.closed) return;
    this.retryTimer = setTimeout(() => {
      void this.reload().then(() => {
        if (this.keys === undefined) this.scheduleRetry();
      });
    }, this.retryDelayMs);
    this.retryTimer.unref();
    this.retryDelayMs = Math.min(this.retryDelayMs * 2, MAX_RETRY_MS);
  }

  private async load(): Promise<void> {
    this.counts.keyLoads++;
    try {
      const { jwks, source } =
        this.settings.jwksFile !== undefined
          ? await this.readJwksFile(this.settings.jwksFile)
          : await this.discoverJwks();
      const keys = await this.importKeySet(jwks, source);
      if (this.closed) return;
      this.install(keys, source);
      this.lastLoadFailed = false;
    } catch (err) {
      this.counts.keyLoadFailures++;
      this.lastLoadFailed = true;
      const source = err instanceof KeyLoadError ? err.source : undefined;
      const problem = err instanceof Error ? err.message : String(err);
      this.log.warn(
        this.settings.jwksFile !== undefined ? { file: source, problem } : { url: source, problem },
        this.keys === undefined
          ? 'could not load the ServiceAccount issuer keys; callers cannot be verified yet'
          : 'could not refresh the ServiceAccount issuer keys; keeping the last good set',
      );
    }
  }

  private async readJwksFile(file: string): Promise<{ jwks: unknown; source: string }> {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      throw new KeyLoadError(
        file,
        `cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`,
      );
    }
    try {
      return { jwks: JSON.parse(text), source: file };
    } catch {
      throw new KeyLoadError(file, 'is not valid JSON');
    }
  }

  private async discoverJwks(): Promise<{ jwks: unknown; source: string }> {
    // Both files are read for every fetch: the CA may rotate, and kubelet rewrites the token.
    const ca = await this.readSetting(this.settings.issuerCaFile, 'TB_AUTH_ISSUER_CA_FILE');
    const bearer = (
      await this.readSetting(this.settings.issuerTokenFile, 'TB_AUTH_ISSUER_TOKEN_FILE')
    )?.trim();
    if (bearer === '') {
      throw new KeyLoadError(this.settings.issuerTokenFile!, 'TB_AUTH_ISSUER_TOKEN_FILE is empty');
    }
    const fetchOptions = { ca, bearer, timeoutMs: this.tuning.fetchTimeoutMs };
    const discoveryUrl = new URL(`${this.settings.issuer.replace(/\/+$/, '')}${DISCOVERY_PATH}`);
    const doc = await fetchJson(discoveryUrl, fetchOptions);
    if (!isRecord(doc))
      throw new KeyLoadError(discoveryUrl.href, 'the answer is not a JSON object');
    if (doc.issuer !== this.settings.issuer) {
      throw new KeyLoadError(
        discoveryUrl.href,
        `names issuer ${JSON.stringify(doc.issuer)}, not ${this.settings.issuer}`,
      );
    }
    let jwksUrl: URL;
    try {
      jwksUrl = new URL(String(doc.jwks_uri));
    } catch {
      throw new KeyLoadError(discoveryUrl.href, 'has no valid jwks_uri');
    }
    if (jwksUrl.protocol !== 'https:') {
      throw new KeyLoadError(discoveryUrl.href, 'names a jwks_uri that is not https');
    }
    return { jwks: await fetchJson(jwksUrl, fetchOptions), source: jwksUrl.href };
  }

  private async readSetting(
    file: string | undefined,
    setting: string,
  ): Promise<string | undefined> {
    if (file === undefined) return undefined;
    try {
      return await readFile(file, 'utf8');
    } catch (err) {
      throw new KeyLoadError(
        file,
        `${setting} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})`,
      );
    }
  }

  private async importKeySet(jwks: unknown, source: string): Promise<Map<string, LoadedKey>> {
    if (!isRecord(jwks) || !Array.isArray(jwks.keys)) {
      throw new KeyLoadError(source, 'is not a JWK set (no "keys" array)');
    }
    const keys = new Map<string, LoadedKey>();
    for (const [index, jwk] of jwks.keys.entries()) {
      const skip = (why: string): void =>
        this.log.warn(
          {
            source,
            index,
            kid: isRecord(jwk) && typeof jwk.kid === 'string' ? jwk.kid : undefined,
          },
          `skipping a key: ${why}`,
        );
      if (!isRecord(jwk)) {
        skip('not a JSON object');
        continue;
      }
      if (typeof jwk.kid !== 'string' || jwk.kid === '') {
        skip('it has no kid');
        continue;
      }
      if (jwk.use !== undefined && jwk.use !== 'sig') {
        skip('its use is not sig');
        continue;
      }
      if ('d' in jwk) {
        skip('it holds private key material');
        continue;
      }
      const algorithms = algorithmsFor(jwk);
      if (typeof algorithms === 'string') {
        skip(algorithms);
        continue;
      }
      const members = PUBLIC_MEMBERS[String(jwk.kty)]!;
      const publicJwk = Object.fromEntries(members.map((m) => [m, jwk[m]])) as JWK;
      try {
        const key = await importJWK(publicJwk, [...algorithms][0]);
        if (key instanceof Uint8Array) throw new Error('not an asymmetric key');
        const bits = (key.algorithm as { modulusLength?: number }).modulusLength;
        if (bits !== undefined && bits < 2048) throw new Error(`RSA key of ${bits} bits`);
        keys.set(jwk.kid, { key, algorithms, fingerprint: JSON.stringify(publicJwk) });
      } catch (err) {
        skip(`it cannot be imported (${err instanceof Error ? err.message : String(err)})`);
      }
    }
    if (keys.size === 0) throw new KeyLoadError(source, 'holds no usable signing key');
    return keys;
  }

  private install(keys: Map<string, LoadedKey>, source: string): void {
    const before = this.keys;
    this.keys = keys;
    const changed =
      before === undefined ||
      before.size !== keys.size ||
      [...keys].some(([kid, key]) => before.get(kid)?.fingerprint !== key.fingerprint);
    if (!changed) return;
    // A token whose key is gone (or now names other material) must not live on in the cache.
    for (const [hash, entry] of this.cache) {
      if (keys.get(entry.kid)?.fingerprint !== before?.get(entry.kid)?.fingerprint) {
        this.cache.delete(hash);
      }
    }
    this.clearRetryBackoff();
    this.log.info({ source, kids: [...keys.keys()] }, 'loaded the ServiceAccount issuer keys');
  }

  private clearRetryBackoff(): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    this.retryDelayMs = FIRST_RETRY_MS;
  }
}
