/**
 * A cluster's trust material for running the broker here as it runs in Kubernetes: a CA and a
 * broker certificate for TLS, a service-account issuer's signing key published as a JWKS file,
 * tokens with the exact claim layout of a projected ServiceAccount token (audience
 * token-broker), and an access policy. The demo and the test topology use it so TLS and caller
 * authentication are on, as in a cluster. Made once per process, synchronously (openssl and
 * node:crypto), in a temporary directory removed at exit.
 */
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync, randomUUID, sign } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The issuer every dev token names, as a cluster's service-account issuer. */
export const DEV_ISSUER = 'https://kubernetes.default.svc.cluster.local';
export const DEV_AUDIENCE = 'token-broker';
/** The name the broker's certificate is issued for (clients verify it). */
export const DEV_SERVER_NAME = 'token-broker.token-broker.svc';
/** The namespace of every dev workload; the default policy lets its service accounts do anything. */
export const DEV_NAMESPACE = 'token-broker-dev';

export interface ServiceAccountClaims {
  namespace: string;
  serviceAccount: string;
  podName?: string;
  audience?: string | string[];
  issuer?: string;
  /** Lifetime in seconds (default 3600). */
  expiresInS?: number;
  /** Seconds before now the token was issued (default 0). */
  issuedAgoS?: number;
}

export interface DevIdentity {
  dir: string;
  /** The CA that signed the broker's certificate: what sidecars and tbctl trust. */
  caFile: string;
  certFile: string;
  keyFile: string;
  serverName: string;
  /** The issuer's public keys (TB_AUTH_JWKS_FILE). */
  jwksFile: string;
  issuer: string;
  audience: string;
  /** A policy letting every service account of DEV_NAMESPACE do everything (TB_POLICY_FILE). */
  policyFile: string;
  /** A signed projected ServiceAccount token. */
  sign(claims: ServiceAccountClaims): string;
  /** A token file for `DEV_NAMESPACE/serviceAccount` (written once, valid for a day). */
  tokenFile(serviceAccount: string): string;
  /** Broker settings that turn TLS and authentication on with this material. */
  brokerEnv(): Record<string, string>;
  /** Sidecar settings for the same. */
  sidecarEnv(serviceAccount?: string): Record<string, string>;
}

let made: DevIdentity | undefined;

export function devIdentity(): DevIdentity {
  return (made ??= makeDevIdentity());
}

function makeDevIdentity(): DevIdentity {
  const dir = mkdtempSync(join(tmpdir(), 'tb-identity-'));
  process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  const caFile = join(dir, 'ca.crt');
  const caKey = join(dir, 'ca.key');
  const certFile = join(dir, 'tls.crt');
  const keyFile = join(dir, 'tls.key');
  const openssl = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  openssl(
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    caKey,
    '-out',
    caFile,
    '-days',
    '2',
    '-subj',
    '/CN=token-broker dev CA',
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  );
  const csr = join(dir, 'tls.csr');
  openssl(
    'req',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    keyFile,
    '-out',
    csr,
    '-subj',
    `/CN=${DEV_SERVER_NAME}`,
  );
  const ext = join(dir, 'tls.ext');
  writeFileSync(
    ext,
    [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature',
      'extendedKeyUsage=serverAuth',
      `subjectAltName=DNS:${DEV_SERVER_NAME},DNS:localhost,IP:127.0.0.1`,
    ].join('\n'),
  );
  openssl(
    'x509',
    '-req',
    '-in',
    csr,
    '-CA',
    caFile,
    '-CAkey',
    caKey,
    '-CAcreateserial',
    '-out',
    certFile,
    '-days',
    '2',
    '-extfile',
    ext,
  );

  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = randomUUID();
  const jwk = {
    ...publicKey.export({ format: 'jwk' }),
    kid,
    alg: 'RS256',
    use: 'sig',
  };
  const jwksFile = join(dir, 'jwks.json');
  writeFileSync(jwksFile, JSON.stringify({ keys: [jwk] }));
  const signingKey = privateKey;

  const policyFile = join(dir, 'policy.yaml');
  writeFileSync(
    policyFile,
    [
      'rules:',
      '  - name: dev-workloads',
      `    subjects: ["${DEV_NAMESPACE}/*"]`,
      '    verbs: [enroll, read, refresh, revoke, list]',
      '    sessions:',
      '      - tenant: "*"',
      '        user: "*"',
      '',
    ].join('\n'),
  );

  const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const signToken = (claims: ServiceAccountClaims): string => {
    const now = Math.floor(Date.now() / 1000) - (claims.issuedAgoS ?? 0);
    const pod = claims.podName ?? `${claims.serviceAccount}-7d4b9c-${randomUUID().slice(0, 5)}`;
    const payload = {
      aud: claims.audience ?? [DEV_AUDIENCE],
      exp: now + (claims.expiresInS ?? 3600),
      iat: now,
      nbf: now,
      iss: claims.issuer ?? DEV_ISSUER,
      jti: randomUUID(),
      'kubernetes.io': {
        namespace: claims.namespace,
        node: { name: 'node-1', uid: randomUUID() },
        pod: { name: pod, uid: randomUUID() },
        serviceaccount: { name: claims.serviceAccount, uid: randomUUID() },
      },
      sub: `system:serviceaccount:${claims.namespace}:${claims.serviceAccount}`,
    };
    const input = `${b64({ alg: 'RS256', kid, typ: 'JWT' })}.${b64(payload)}`;
    return `${input}.${sign('sha256', Buffer.from(input), signingKey).toString('base64url')}`;
  };
  const tokenFiles = new Map<string, string>();
  const tokenFile = (serviceAccount: string): string => {
    let file = tokenFiles.get(serviceAccount);
    if (!file) {
      file = join(dir, `token-${serviceAccount}`);
      writeFileSync(
        file,
        signToken({ namespace: DEV_NAMESPACE, serviceAccount, expiresInS: 86_400 }),
        { mode: 0o600 },
      );
      tokenFiles.set(serviceAccount, file);
    }
    return file;
  };
  return {
    dir,
    caFile,
    certFile,
    keyFile,
    serverName: DEV_SERVER_NAME,
    jwksFile,
    issuer: DEV_ISSUER,
    audience: DEV_AUDIENCE,
    policyFile,
    sign: signToken,
    tokenFile,
    brokerEnv: () => ({
      TB_TLS_CERT_FILE: certFile,
      TB_TLS_KEY_FILE: keyFile,
      TB_AUTH_ISSUER: DEV_ISSUER,
      TB_AUTH_JWKS_FILE: jwksFile,
      TB_POLICY_FILE: policyFile,
    }),
    sidecarEnv: (serviceAccount = 'module') => ({
      TB_SIDECAR_BROKER_CA_FILE: caFile,
      TB_SIDECAR_BROKER_SERVER_NAME: DEV_SERVER_NAME,
      TB_SIDECAR_TOKEN_FILE: tokenFile(serviceAccount),
    }),
  };
}
