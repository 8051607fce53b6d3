import { X509Certificate, createPrivateKey, type KeyObject } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import type { experimental } from '@grpc/grpc-js';

/**
 * PEM certificate, key and CA files that are validated as one unit and re-read when they change,
 * offered to grpc-js as a CertificateProvider (its experimental certificate-provider credentials
 * then swap the listener's or channel's SecureContext: new connections get the new files, open
 * ones keep theirs).
 *
 * Why not grpc-js's own FileWatcherCertificateProvider: it hands on whatever it read, and a file
 * caught half-written (or a new certificate before its new key) makes grpc-js's server drop every
 * new connection until the next good read. Here a broken set is refused with a warning and the last
 * good one stays in force.
 */

/** A file and the setting that names it, so every error says what to fix. */
export interface TlsFile {
  path: string;
  /** The variable or option naming the file, e.g. TB_TLS_CERT_FILE. */
  setting: string;
}

/** The part of a pino logger this module uses. */
export interface TlsLog {
  warn(fields: object, message: string): void;
  info(fields: object, message: string): void;
}

/** A TLS file is missing, unreadable or invalid. The message never contains file content. */
export class TlsFileError extends Error {
  readonly code = 'TLS_FILE_INVALID';
  constructor(
    readonly setting: string,
    readonly path: string,
    readonly problem: string,
  ) {
    super(`${setting} (${path}) ${problem}`);
    this.name = 'TlsFileError';
  }
}

export interface TlsIdentity {
  certificate: Buffer;
  privateKey: Buffer;
  /** The first certificate of the chain: the one the key belongs to. */
  leaf: X509Certificate;
}

export interface TlsCaBundle {
  caCertificate: Buffer;
  certificates: X509Certificate[];
}

export interface TlsMaterial {
  identity: TlsIdentity | undefined;
  ca: TlsCaBundle | undefined;
}

export interface TlsFileSet {
  identity?: { cert: TlsFile; key: TlsFile } | undefined;
  ca?: TlsFile | undefined;
}

const CERT_BLOCK = /-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----/g;
const CERT_BEGIN = /-----BEGIN CERTIFICATE-----/g;

function errorCode(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as NodeJS.ErrnoException).code;
    return code ?? error.message;
  }
  return String(error);
}

// OpenSSL's messages name the failing routine, never the data, so they are safe to pass on.
function opensslReason(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function readTlsFile(file: TlsFile): Buffer {
  try {
    return readFileSync(file.path);
  } catch (error) {
    throw new TlsFileError(file.setting, file.path, `cannot be read (${errorCode(error)})`);
  }
}

/** Every certificate of a PEM bundle, refusing a bundle cut off mid-certificate. */
export function parseCertificates(pem: Buffer, file: TlsFile): X509Certificate[] {
  const text = pem.toString('latin1');
  const blocks = text.match(CERT_BLOCK) ?? [];
  const begins = text.match(CERT_BEGIN)?.length ?? 0;
  if (begins === 0) throw new TlsFileError(file.setting, file.path, 'holds no PEM certificate');
  if (blocks.length !== begins) {
    throw new TlsFileError(
      file.setting,
      file.path,
      `is incomplete: ${begins - blocks.length} of ${begins} certificates have no END line (half-written?)`,
    );
  }
  return blocks.map((block, index) => {
    try {
      return new X509Certificate(block);
    } catch (error) {
      throw new TlsFileError(
        file.setting,
        file.path,
        `certificate ${index + 1} cannot be parsed: ${opensslReason(error)}`,
      );
    }
  });
}

function parsePrivateKey(pem: Buffer, file: TlsFile): KeyObject {
  try {
    return createPrivateKey(pem);
  } catch (error) {
    // The reason is OpenSSL's routine name; the key itself is never part of the message.
    throw new TlsFileError(
      file.setting,
      file.path,
      `is not a usable unencrypted PEM private key: ${opensslReason(error)}`,
    );
  }
}

/** Reads and validates the whole set synchronously; throws TlsFileError naming the bad file. */
export function loadTlsMaterial(files: TlsFileSet): TlsMaterial {
  let identity: TlsIdentity | undefined;
  if (files.identity !== undefined) {
    const { cert, key } = files.identity;
    const certificate = readTlsFile(cert);
    const [leaf] = parseCertificates(certificate, cert);
    const privateKey = readTlsFile(key);
    const keyObject = parsePrivateKey(privateKey, key);
    if (!leaf!.checkPrivateKey(keyObject)) {
      throw new TlsFileError(
        key.setting,
        key.path,
        `does not match the certificate in ${cert.setting} (${cert.path})`,
      );
    }
    try {
      createSecureContext({ cert: certificate, key: privateKey });
    } catch (error) {
      throw new TlsFileError(cert.setting, cert.path, `is refused by TLS: ${opensslReason(error)}`);
    }
    identity = { certificate, privateKey, leaf: leaf! };
  }
  let ca: TlsCaBundle | undefined;
  if (files.ca !== undefined) {
    const caCertificate = readTlsFile(files.ca);
    const certificates = parseCertificates(caCertificate, files.ca);
    try {
      createSecureContext({ ca: caCertificate });
    } catch (error) {
      throw new TlsFileError(
        files.ca.setting,
        files.ca.path,
        `is refused by TLS: ${opensslReason(error)}`,
      );
    }
    ca = { caCertificate, certificates };
  }
  return { identity, ca };
}

// Follows symlinks, so a Kubernetes Secret mount's `..data` swap shows as a new inode.
function fileSignature(path: string): string {
  try {
    const s = statSync(path, { bigint: true });
    return `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}:${s.ctimeNs}`;
  } catch (error) {
    return `error:${errorCode(error)}`;
  }
}

function sameBuffer(a: Buffer | undefined, b: Buffer | undefined): boolean {
  return a === b || (a !== undefined && b !== undefined && a.equals(b));
}

function describeIdentity(identity: TlsIdentity): Record<string, string> {
  return {
    subject: identity.leaf.subject.replaceAll('\n', ', '),
    serialNumber: identity.leaf.serialNumber,
    fingerprint256: identity.leaf.fingerprint256,
    validTo: identity.leaf.validTo,
  };
}

export interface WatchedTlsFilesOptions {
  files: TlsFileSet;
  /** How often the files are checked for a change (a stat per file). */
  refreshMs: number;
  log: TlsLog;
  /** What the files are for, in log lines: "gRPC server certificate". */
  purpose: string;
}

type CertificateProvider = experimental.CertificateProvider;
type CaListener = experimental.CaCertificateUpdateListener;
type IdentityListener = experimental.IdentityCertificateUpdateListener;

/**
 * Loads the files at construction (throwing TlsFileError, so start-up fails before serving) and
 * then polls them while grpc-js holds a listener. Polling a stat is cheap and, unlike fs.watch,
 * sees both in-place rewrites (cert-manager) and symlink swaps (kubelet).
 */
export class WatchedTlsFiles implements CertificateProvider {
  private material: TlsMaterial;
  private seen: string;
  private timer: NodeJS.Timeout | undefined;
  private readonly caListeners = new Set<CaListener>();
  private readonly identityListeners = new Set<IdentityListener>();

  constructor(private readonly options: WatchedTlsFilesOptions) {
    if (options.files.identity === undefined && options.files.ca === undefined) {
      throw new Error('WatchedTlsFiles needs a certificate and key, a CA file, or both');
    }
    // Stat before reading: a change during the read then shows as a new signature next check.
    this.seen = this.signature();
    this.material = loadTlsMaterial(options.files);
    this.warnIfOutOfDate();
  }

  /** The set in force: the last one that validated. */
  current(): TlsMaterial {
    return this.material;
  }

  /** Re-reads the files if any changed; keeps the last good set if the new one is broken. */
  check(): void {
    const signature = this.signature();
    if (signature === this.seen) return;
    this.seen = signature;
    let next: TlsMaterial;
    try {
      next = loadTlsMaterial(this.options.files);
    } catch (error) {
      const problem =
        error instanceof TlsFileError
          ? { setting: error.setting, path: error.path, problem: error.problem }
          : { problem: opensslReason(error) };
      this.options.log.warn(
        problem,
        `${this.options.purpose}: changed files refused, the last good ones stay in use: ${error instanceof Error ? error.message : String(error)}`,
      );
      return;
    }
    const previous = this.material;
    this.material = next;
    const identityChanged =
      !sameBuffer(previous.identity?.certificate, next.identity?.certificate) ||
      !sameBuffer(previous.identity?.privateKey, next.identity?.privateKey);
    const caChanged = !sameBuffer(previous.ca?.caCertificate, next.ca?.caCertificate);
    if (!identityChanged && !caChanged) return;
    this.options.log.info(
      {
        ...(next.identity === undefined ? {} : describeIdentity(next.identity)),
        ...(next.ca === undefined ? {} : { caCertificates: next.ca.certificates.length }),
      },
      `${this.options.purpose}: reloaded changed files; new connections use them`,
    );
    this.warnIfOutOfDate();
    if (caChanged) for (const listener of this.caListeners) listener(this.caUpdate());
    if (identityChanged)
      for (const listener of this.identityListeners) listener(this.identityUpdate());
  }

  addCaCertificateListener(listener: CaListener): void {
    this.caListeners.add(listener);
    this.startWatching();
    process.nextTick(() => {
      if (this.caListeners.has(listener)) listener(this.caUpdate());
    });
  }

  removeCaCertificateListener(listener: CaListener): void {
    this.caListeners.delete(listener);
    this.maybeStopWatching();
  }

  addIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.add(listener);
    this.startWatching();
    process.nextTick(() => {
      if (this.identityListeners.has(listener)) listener(this.identityUpdate());
    });
  }

  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.delete(listener);
    this.maybeStopWatching();
  }

  private caUpdate(): experimental.CaCertificateUpdate | null {
    const ca = this.material.ca;
    return ca === undefined ? null : { caCertificate: ca.caCertificate };
  }

  private identityUpdate(): experimental.IdentityCertificateUpdate | null {
    const identity = this.material.identity;
    return identity === undefined
      ? null
      : { certificate: identity.certificate, privateKey: identity.privateKey };
  }

  private startWatching(): void {
    if (this.timer !== undefined) return;
    // A listener arriving after a quiet spell should not wait a whole period for fresh files.
    this.check();
    this.timer = setInterval(() => this.check(), this.options.refreshMs);
    this.timer.unref();
  }

  private maybeStopWatching(): void {
    if (this.caListeners.size > 0 || this.identityListeners.size > 0) return;
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private signature(): string {
    const { identity, ca } = this.options.files;
    const paths = [identity?.cert.path, identity?.key.path, ca?.path];
    return paths.map((path) => (path === undefined ? '-' : fileSignature(path))).join('|');
  }

  private warnIfOutOfDate(): void {
    const identity = this.material.identity;
    if (identity === undefined) return;
    const now = Date.now();
    const cert = this.options.files.identity!.cert;
    if (Date.parse(identity.leaf.validTo) <= now || Date.parse(identity.leaf.validFrom) > now) {
      this.options.log.warn(
        { setting: cert.setting, path: cert.path, ...describeIdentity(identity) },
        `${this.options.purpose}: ${cert.setting} holds a certificate outside its validity period; peers will refuse it`,
      );
    }
  }
}
