/**
 * A stand-in for the Kubernetes API server's ServiceAccount token issuer, over real HTTPS on
 * 127.0.0.1 with a CA made at test time:
 *
 *   const k8s = await K8sIssuer.start({ bearerToken: 'reader-token' });
 *   k8s.issuer;  k8s.ca.certFile;                   // TB_AUTH_ISSUER, TB_AUTH_ISSUER_CA_FILE
 *   const token = await k8s.sign({ namespace: 'folio', serviceAccount: 'mod-x', podName: 'p-1' });
 *   const kid = await k8s.rotateKey({ dropOld: true });
 *   k8s.counters.jwks;                              // JWKS requests answered 200
 *   await k8s.close();
 *
 * It serves `/.well-known/openid-configuration` (issuer, jwks_uri = <issuer>/openid/v1/jwks)
 * and `/openid/v1/jwks`, like kube-apiserver. With `bearerToken` set (or requireBearer()), both
 * answer 401 unless `Authorization: Bearer <that token>` is sent, as the API server does for a
 * caller without the service-account-issuer-discovery role. Key ids are the base64url SHA-256
 * of the public key's DER, as kube-apiserver computes them.
 *
 * Tokens from sign() carry exactly the claim layout of a projected ServiceAccount token; the
 * forge* helpers craft the bad ones an attacker would try. Token values are never stored.
 */
import { createHash, KeyObject, randomUUID } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';

import {
  exportJWK,
  exportSPKI,
  generateKeyPair,
  SignJWT,
  type CryptoKey,
  type JWK,
  type JWTPayload,
} from 'jose';

import { rmSync } from 'node:fs';
import { makeCa, makeLeaf, type TestCa, type TestLeaf } from './test-certs.js';

export type IssuerAlg = 'RS256' | 'ES256';

export interface K8sIssuerOptions {
  /** Algorithm of the first signing key (default RS256, kube-apiserver's usual). */
  alg?: IssuerAlg;
  /** Require this bearer token on discovery and JWKS requests. */
  bearerToken?: string;
  /** Epoch ms used for iat/nbf/exp; share it with the verifier under test. */
  clock?: () => number;
}

export interface SignOptions {
  namespace: string;
  serviceAccount: string;
  /** When set, the token is bound to this pod (and a node), as a projected volume token is. */
  podName?: string;
  audience?: string | string[];
  /** Lifetime from iat (default 3600). Negative makes an already-expired token. */
  expiresInS?: number;
  issuer?: string;
  /** nbf relative to iat (default 0, as Kubernetes sets it). */
  notBeforeS?: number;
  /** Header kid to claim; the token is still signed with the current key. */
  kid?: string;
  /** Override `sub` (default system:serviceaccount:<ns>:<sa>). */
  sub?: string;
}

interface SigningKey {
  readonly kid: string;
  readonly alg: IssuerAlg;
  readonly privateKey: CryptoKey;
  readonly publicKey: CryptoKey;
  readonly publicJwk: JWK;
  readonly spkiPem: string;
}

export interface IssuerCounters {
  /** Discovery requests answered 200. */
  discovery: number;
  /** JWKS requests answered 200. */
  jwks: number;
  /** Requests refused for a missing or wrong bearer token. */
  unauthorized: number;
}

const DISCOVERY_PATH = '/.well-known/openid-configuration';
const JWKS_PATH = '/openid/v1/jwks';

function b64url(value: string | Buffer): string {
  return Buffer.from(value).toString('base64url');
}

async function newSigningKey(alg: IssuerAlg): Promise<SigningKey> {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
  const der = KeyObject.from(publicKey).export({ type: 'spki', format: 'der' });
  const kid = createHash('sha256').update(der).digest('base64url');
  const jwk = await exportJWK(publicKey);
  return {
    kid,
    alg,
    privateKey,
    publicKey,
    publicJwk: { ...jwk, use: 'sig', kid, alg },
    spkiPem: await exportSPKI(publicKey),
  };
}

export class K8sIssuer {
  readonly counters: IssuerCounters = { discovery: 0, jwks: 0, unauthorized: 0 };
  private keys: SigningKey[];
  private bearer: string | undefined;
  private unavailable = false;

  private constructor(
    readonly issuer: string,
    readonly ca: TestCa,
    private readonly leaf: TestLeaf,
    private readonly server: Server,
    first: SigningKey,
    options: K8sIssuerOptions,
    private readonly clock: () => number,
  ) {
    this.keys = [first];
    this.bearer = options.bearerToken;
  }

  static async start(options: K8sIssuerOptions = {}): Promise<K8sIssuer> {
    const ca = await makeCa('k8s-test-ca');
    const leaf = await makeLeaf(ca, {
      commonName: 'kube-apiserver',
      dnsNames: ['localhost'],
      ipAddresses: ['127.0.0.1'],
    });
    const first = await newSigningKey(options.alg ?? 'RS256');
    // The handler needs the instance, which needs the server's port: resolved after listen().
    const ref: { self?: K8sIssuer } = {};
    const server = createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
      ref.self!.handle(req.url ?? '', req.headers.authorization, res);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const { port } = server.address() as AddressInfo;
    ref.self = new K8sIssuer(
      `https://127.0.0.1:${port}`,
      ca,
      leaf,
      server,
      first,
      options,
      options.clock ?? Date.now,
    );
    return ref.self;
  }

  get jwksUri(): string {
    return `${this.issuer}${JWKS_PATH}`;
  }

  get currentKid(): string {
    return this.current.kid;
  }

  /** The published key set, e.g. to write a TB_AUTH_JWKS_FILE. */
  jwks(): { keys: JWK[] } {
    return { keys: this.keys.map((k) => ({ ...k.publicJwk })) };
  }

  /** Require this bearer on discovery and JWKS from now on (undefined: require none). */
  requireBearer(token: string | undefined): void {
    this.bearer = token;
  }

  /** While on, discovery and JWKS answer 503 (an API server that is down). */
  setUnavailable(on: boolean): void {
    this.unavailable = on;
  }

  /** Adds a new signing key with a new kid, used for sign() from now on; returns its kid. */
  async rotateKey(options: { alg?: IssuerAlg; dropOld?: boolean } = {}): Promise<string> {
    const next = await newSigningKey(options.alg ?? this.current.alg);
    this.keys = options.dropOld === true ? [next] : [...this.keys, next];
    return next.kid;
  }

  /** Claims exactly as kube-apiserver puts them in a projected ServiceAccount token. */
  claims(options: SignOptions): JWTPayload {
    const iat = Math.floor(this.clock() / 1000);
    const k8s: Record<string, unknown> = {
      namespace: options.namespace,
      serviceaccount: { name: options.serviceAccount, uid: randomUUID() },
    };
    if (options.podName !== undefined) {
      k8s.node = { name: 'node-1', uid: randomUUID() };
      k8s.pod = { name: options.podName, uid: randomUUID() };
    }
    const audience = options.audience ?? 'token-broker';
    return {
      aud: Array.isArray(audience) ? audience : [audience],
      exp: iat + (options.expiresInS ?? 3600),
      iat,
      iss: options.issuer ?? this.issuer,
      jti: randomUUID(),
      'kubernetes.io': k8s,
      nbf: iat + (options.notBeforeS ?? 0),
      sub: options.sub ?? `system:serviceaccount:${options.namespace}:${options.serviceAccount}`,
    };
  }

  async sign(options: SignOptions): Promise<string> {
    const key = this.current;
    return new SignJWT(this.claims(options))
      .setProtectedHeader({ alg: key.alg, kid: options.kid ?? key.kid })
      .sign(key.privateKey);
  }

  /** An unsigned token (`alg: none`) naming the current kid. */
  forgeAlgNone(options: SignOptions): string {
    const header = b64url(JSON.stringify({ alg: 'none', kid: this.current.kid }));
    return `${header}.${b64url(JSON.stringify(this.claims(options)))}.`;
  }

  /** HS256 "signed" with the current public key's PEM: the classic key-confusion attack. */
  async forgeHs256WithPublicKey(options: SignOptions): Promise<string> {
    return new SignJWT(this.claims(options))
      .setProtectedHeader({ alg: 'HS256', kid: this.current.kid })
      .sign(new TextEncoder().encode(this.current.spkiPem));
  }

  /** Signed by a key the issuer never published, but claiming the current kid. */
  async forgeWithForeignKey(options: SignOptions): Promise<string> {
    const foreign = await newSigningKey(this.current.alg);
    return new SignJWT(this.claims(options))
      .setProtectedHeader({ alg: foreign.alg, kid: this.current.kid })
      .sign(foreign.privateKey);
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.ca.dir, { recursive: true, force: true });
  }

  private get current(): SigningKey {
    return this.keys[this.keys.length - 1]!;
  }

  private handle(url: string, authorization: string | undefined, res: ServerResponse): void {
    const send = (status: number, body: unknown): void => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    const path = url.split('?')[0];
    if (path !== DISCOVERY_PATH && path !== JWKS_PATH) {
      send(404, { kind: 'Status', status: 'Failure', reason: 'NotFound', code: 404 });
      return;
    }
    if (this.bearer !== undefined && authorization !== `Bearer ${this.bearer}`) {
      this.counters.unauthorized++;
      send(401, { kind: 'Status', status: 'Failure', reason: 'Unauthorized', code: 401 });
      return;
    }
    if (this.unavailable) {
      send(503, { kind: 'Status', status: 'Failure', reason: 'ServiceUnavailable', code: 503 });
      return;
    }
    if (path === DISCOVERY_PATH) {
      this.counters.discovery++;
      send(200, {
        issuer: this.issuer,
        jwks_uri: this.jwksUri,
        response_types_supported: ['id_token'],
        subject_types_supported: ['public'],
        id_token_signing_alg_values_supported: [...new Set(this.keys.map((k) => k.alg))],
      });
      return;
    }
    this.counters.jwks++;
    send(200, this.jwks());
  }
}
