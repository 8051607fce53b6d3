import { readFileSync, statSync } from 'node:fs';
import { getCACertificates } from 'node:tls';
import { performance } from 'node:perf_hooks';
import * as grpc from '@grpc/grpc-js';
import { WatchedTlsFiles, type TlsFile, type TlsLog } from './watched-tls-files.js';

/**
 * How a broker client (the sidecar, tbctl) reaches the broker: TLS that verifies the broker's
 * certificate against a CA bundle re-read on change, and a bearer token read from a file that
 * kubelet rewrites, attached to every new call and stream by an interceptor. An interceptor rather
 * than call credentials, because grpc-js refuses call credentials on insecure channels.
 */

export interface ClientTlsSettings {
  /** CA bundle trusted for the broker, re-read on change; undefined: the default roots. */
  caFile: string | undefined;
  /** The name the broker's certificate must carry, when the address is not it. */
  serverName: string | undefined;
  /** A client certificate chain and key for mTLS, re-read on change; both or neither. */
  certFile?: string;
  keyFile?: string;
  /** How often the files are checked for a change; default 5000. */
  refreshMs?: number;
}

export interface ClientTransportSettings {
  tls: 'off' | ClientTlsSettings;
  /** A file holding the bearer token; undefined: send no token. */
  tokenFile: string | undefined;
  /**
   * How long a token read from the file is sent without looking at the file again (default
   * 1000 ms). kubelet rewrites a projected token at 80% of its life, so a second's delay is
   * harmless, and calls in between cost no system call.
   */
  tokenRecheckMs?: number;
  /** The settings behind each file (e.g. TB_SIDECAR_BROKER_CA_FILE), named in errors. */
  settingNames?: { caFile?: string; certFile?: string; keyFile?: string; tokenFile?: string };
}

export interface ClientTransport {
  credentials: grpc.ChannelCredentials;
  options: grpc.ChannelOptions;
  interceptors: grpc.Interceptor[];
}

/** The token file is missing, empty or unusable. The message never contains the token. */
export class TokenFileError extends Error {
  readonly code = 'TOKEN_FILE_UNUSABLE';
  constructor(
    readonly setting: string,
    readonly path: string,
    readonly problem: string,
  ) {
    super(`${setting} (${path}) ${problem}`);
    this.name = 'TokenFileError';
  }
}

// A JWT is base64url and dots; anything outside visible ASCII would also be refused by grpc-js's
// metadata check, whose error message quotes the value.
const HEADER_SAFE = /^[\x21-\x7e]+$/;

function errorCode(error: unknown): string {
  if (error instanceof Error) return (error as NodeJS.ErrnoException).code ?? error.message;
  return String(error);
}

/** A bearer token file, re-read only when a stat shows it changed. */
export class BearerTokenFile {
  private cached: { signature: string; token: string } | undefined;
  private checkedAt = -Infinity;

  constructor(
    readonly path: string,
    readonly setting = 'token file',
    private readonly recheckMs = 0,
  ) {}

  /** The current token; throws TokenFileError. */
  read(): string {
    const now = performance.now();
    if (this.cached && now - this.checkedAt < this.recheckMs) return this.cached.token;
    this.checkedAt = now;
    let signature: string;
    try {
      const s = statSync(this.path, { bigint: true });
      signature = `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}:${s.ctimeNs}`;
    } catch (error) {
      this.cached = undefined;
      throw new TokenFileError(this.setting, this.path, `cannot be read (${errorCode(error)})`);
    }
    if (this.cached?.signature === signature) return this.cached.token;
    let text: string;
    try {
      text = readFileSync(this.path, 'utf8');
    } catch (error) {
      throw new TokenFileError(this.setting, this.path, `cannot be read (${errorCode(error)})`);
    }
    const token = text.trim();
    if (token === '') throw new TokenFileError(this.setting, this.path, 'is empty');
    if (!HEADER_SAFE.test(token)) {
      throw new TokenFileError(
        this.setting,
        this.path,
        'holds characters a header cannot carry (whitespace or non-ASCII inside the token)',
      );
    }
    this.cached = { signature, token };
    return token;
  }
}

/**
 * Adds `authorization: Bearer <token>` to every call as it starts, read fresh from the file. When
 * the file cannot be used the call ends with UNAUTHENTICATED naming the file, before anything
 * reaches the broker.
 */
export function bearerTokenInterceptor(tokenFile: BearerTokenFile): grpc.Interceptor {
  return (options, nextCall) => {
    const call: grpc.InterceptingCall = new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        let token: string;
        try {
          token = tokenFile.read();
        } catch (error) {
          // Started and cancelled at once: grpc-js then reports the status to the caller.
          next(metadata, listener);
          call.cancelWithStatus(
            grpc.status.UNAUTHENTICATED,
            error instanceof TokenFileError
              ? `no bearer token for the broker: ${error.message}`
              : `no bearer token for the broker: ${tokenFile.setting} (${tokenFile.path}) cannot be used`,
          );
          return;
        }
        metadata.set('authorization', `Bearer ${token}`);
        next(metadata, listener);
      },
    });
    return call;
  };
}

// For mTLS without a CA file: the CA slot still needs a bundle, so hand over Node's default one.
function defaultRootsProvider(): grpc.experimental.CertificateProvider {
  const caCertificate = Buffer.from(getCACertificates('default').join('\n'));
  return {
    addCaCertificateListener: (listener) => process.nextTick(listener, { caCertificate }),
    removeCaCertificateListener: () => undefined,
    addIdentityCertificateListener: (listener) => process.nextTick(listener, null),
    removeIdentityCertificateListener: () => undefined,
  };
}

function tlsCredentials(
  tls: ClientTlsSettings,
  names: NonNullable<ClientTransportSettings['settingNames']>,
  log: TlsLog,
): grpc.ChannelCredentials {
  const certSetting = names.certFile ?? 'client certificate file';
  const keySetting = names.keyFile ?? 'client key file';
  if ((tls.certFile === undefined) !== (tls.keyFile === undefined)) {
    throw new Error(`${certSetting} and ${keySetting} must be set together`);
  }
  const identity =
    tls.certFile === undefined || tls.keyFile === undefined
      ? undefined
      : {
          cert: { path: tls.certFile, setting: certSetting },
          key: { path: tls.keyFile, setting: keySetting },
        };
  const ca: TlsFile | undefined =
    tls.caFile === undefined
      ? undefined
      : { path: tls.caFile, setting: names.caFile ?? 'broker CA file' };
  if (ca === undefined && identity === undefined) {
    return grpc.credentials.createSsl();
  }
  // Validated now, so a bad file fails at start-up with TlsFileError naming its setting.
  const files = new WatchedTlsFiles({
    files: { identity, ca },
    refreshMs: tls.refreshMs ?? 5000,
    log,
    purpose: 'broker client TLS',
  });
  // Unlike the server's, this factory reads its arguments in the declared order (CA, identity).
  return grpc.experimental.createCertificateProviderChannelCredentials(
    ca === undefined ? defaultRootsProvider() : files,
    identity === undefined ? null : files,
  );
}

const warningLog: TlsLog = {
  warn: (_fields, message) => process.emitWarning(message, 'TlsFileWarning'),
  info: () => undefined,
};

/**
 * Credentials, channel options and interceptors for a client of the broker; pass all three to
 * the generated client's constructor (`interceptors` goes into its options). Throws TlsFileError
 * when a TLS file is unusable at start.
 */
export function clientTransport(
  settings: ClientTransportSettings,
  log: TlsLog = warningLog,
): ClientTransport {
  const names = settings.settingNames ?? {};
  const options: grpc.ChannelOptions = {};
  let credentials: grpc.ChannelCredentials;
  if (settings.tls === 'off') {
    credentials = grpc.credentials.createInsecure();
  } else {
    credentials = tlsCredentials(settings.tls, names, log);
    // grpc-js then sends this name as SNI and checks the certificate against it instead of the
    // address (channel-credentials.js getConnectionOptions).
    if (settings.tls.serverName !== undefined && settings.tls.serverName !== '') {
      options['grpc.ssl_target_name_override'] = settings.tls.serverName;
    }
  }
  const interceptors =
    settings.tokenFile === undefined
      ? []
      : [
          bearerTokenInterceptor(
            new BearerTokenFile(
              settings.tokenFile,
              names.tokenFile,
              settings.tokenRecheckMs ?? 1_000,
            ),
          ),
        ];
  return { credentials, options, interceptors };
}
