import { X509Certificate } from 'node:crypto';
import type { PeerCertificate } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { TlsFileError, WatchedTlsFiles, type TlsLog } from '../../shared/watched-tls-files.js';
import { ConfigError } from '../errors.js';

export interface ServerTlsSettings {
  certFile: string;
  keyFile: string;
  /** When set, clients must present a certificate that chains to this bundle. */
  clientCaFile: string | undefined;
  /** How often the files are checked for a change; default 5000. */
  refreshMs?: number;
}

export const SERVER_TLS_SETTING = {
  certFile: 'TB_TLS_CERT_FILE',
  keyFile: 'TB_TLS_KEY_FILE',
  clientCaFile: 'TB_TLS_CLIENT_CA_FILE',
} as const;

/**
 * Server credentials for the broker's listener whose files are re-read when they change: new
 * connections get the new certificate (and client CA), open connections and their streams keep
 * theirs. The files are validated synchronously here, so a bad start-up set throws a ConfigError
 * naming the variable before anything listens; a bad set written later is refused with a warning
 * while the last good one keeps serving.
 */
export function serverTlsCredentials(
  settings: ServerTlsSettings,
  log: TlsLog,
): grpc.ServerCredentials {
  let files: WatchedTlsFiles;
  try {
    files = new WatchedTlsFiles({
      files: {
        identity: {
          cert: { path: settings.certFile, setting: SERVER_TLS_SETTING.certFile },
          key: { path: settings.keyFile, setting: SERVER_TLS_SETTING.keyFile },
        },
        ca:
          settings.clientCaFile === undefined
            ? undefined
            : { path: settings.clientCaFile, setting: SERVER_TLS_SETTING.clientCaFile },
      },
      refreshMs: settings.refreshMs ?? 5000,
      log,
      purpose: 'gRPC server TLS',
    });
  } catch (error) {
    if (error instanceof TlsFileError) {
      throw new ConfigError(error.setting, `(${error.path}) ${error.problem}`);
    }
    throw error;
  }
  const requireClientCertificate = settings.clientCaFile !== undefined;
  // grpc-js 1.14 declares (caProvider, identityProvider) but hands its FIRST argument to the
  // identity slot and the second to the CA slot (server-credentials.js); a non-null CA slot is
  // what makes the server ask for client certificates. The TLS integration tests fail if a
  // grpc-js upgrade changes this.
  return grpc.experimental.createCertificateProviderServerCredentials(
    files,
    requireClientCertificate ? files : null,
    requireClientCertificate,
  );
}

/** What a verified client certificate says about its holder. */
export interface PeerCertificateIdentity {
  /** The subject's common name, or '' when it has none. */
  commonName: string;
  dnsNames: string[];
  /** URI SANs, e.g. a SPIFFE ID. */
  uris: string[];
  serialNumber: string;
  fingerprint256: string;
}

/** The part of a grpc-js server call (or server interceptor call) this reads. */
export interface CallWithAuthContext {
  getAuthContext(): { sslPeerCertificate?: PeerCertificate | undefined };
}

// Node renders SANs as "DNS:a, URI:b, IP Address:c"; values holding ", " come JSON-quoted.
function subjectAltNames(text: string | undefined): { type: string; value: string }[] {
  if (text === undefined || text === '') return [];
  return text.split(/, (?=[A-Za-z ]+:)/).flatMap((entry) => {
    const colon = entry.indexOf(':');
    if (colon < 0) return [];
    const raw = entry.slice(colon + 1);
    let value = raw;
    if (raw.startsWith('"')) {
      try {
        value = JSON.parse(raw) as string;
      } catch {
        return [];
      }
    }
    return [{ type: entry.slice(0, colon), value }];
  });
}

/**
 * The identity in the client certificate of a call's connection, when mTLS is on and the
 * certificate was verified against TB_TLS_CLIENT_CA_FILE; undefined otherwise (grpc-js reports
 * no certificate for unverified peers).
 */
export function peerCertificateIdentity(
  call: CallWithAuthContext,
): PeerCertificateIdentity | undefined {
  const peer = call.getAuthContext().sslPeerCertificate;
  if (peer?.raw === undefined) return undefined;
  const cert = new X509Certificate(peer.raw);
  const names = subjectAltNames(cert.subjectAltName);
  const commonName =
    cert.subject
      .split('\n')
      .find((line) => line.startsWith('CN='))
      ?.slice(3) ?? '';
  return {
    commonName,
    dnsNames: names.filter((n) => n.type === 'DNS').map((n) => n.value),
    uris: names.filter((n) => n.type === 'URI').map((n) => n.value),
    serialNumber: cert.serialNumber,
    fingerprint256: cert.fingerprint256,
  };
}
