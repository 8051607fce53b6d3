import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

/**
 * Certificates made at test time with openssl (node:crypto cannot sign X.509): a CA per call to
 * makeCa, leaves signed by it, each in its own temp directory removed when the process exits.
 * Keys are EC P-256 (fast to make); every certificate has a random serial so tests can tell two
 * leaves of the same names apart.
 */

const OPENSSL = '/usr/bin/openssl';
const run = promisify(execFile);

export interface TestCa {
  name: string;
  certPem: string;
  keyPem: string;
  certFile: string;
  keyFile: string;
  /** Directory holding this CA's files and those of the leaves it signs. */
  dir: string;
}

export interface LeafOptions {
  commonName: string;
  dnsNames?: string[];
  ipAddresses?: string[];
  /** A client certificate (extendedKeyUsage clientAuth) instead of a server one. */
  client?: boolean;
  /** Validity in days from now; default 2. */
  days?: number;
}

export interface TestLeaf {
  certPem: string;
  keyPem: string;
  certFile: string;
  keyFile: string;
  /** Hex serial as node:tls reports it (upper case, no separators). */
  serialNumber: string;
}

const madeDirs = new Set<string>();
process.once('exit', removeTestCerts);

/** Removes every directory this module made; also runs at process exit. */
export function removeTestCerts(): void {
  for (const dir of madeDirs) rmSync(dir, { recursive: true, force: true });
  madeDirs.clear();
}

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'tb-certs-'));
  madeDirs.add(dir);
  return dir;
}

// Config values are written literally; keep test names to what a config line can hold.
function configValue(value: string): string {
  if (!/^[\w .@*:-]+$/.test(value))
    throw new Error(`test certificate name ${value} has characters openssl config would misread`);
  return value;
}

function randomSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x7f) | 0x10; // positive and a fixed length, so the hex form is stable
  return bytes.toString('hex').toUpperCase();
}

async function newKey(keyFile: string): Promise<void> {
  await run(OPENSSL, [
    'genpkey',
    '-algorithm',
    'EC',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-out',
    keyFile,
  ]);
}

export async function makeCa(name: string): Promise<TestCa> {
  const dir = tempDir();
  const keyFile = join(dir, 'ca.key');
  const certFile = join(dir, 'ca.crt');
  const configFile = join(dir, 'ca.cnf');
  writeFileSync(
    configFile,
    [
      '[req]',
      'prompt = no',
      'distinguished_name = dn',
      'x509_extensions = v3',
      '[dn]',
      `CN = ${configValue(name)}`,
      '[v3]',
      'basicConstraints = critical,CA:TRUE',
      'keyUsage = critical,keyCertSign,cRLSign',
      'subjectKeyIdentifier = hash',
      '',
    ].join('\n'),
  );
  await newKey(keyFile);
  await run(OPENSSL, [
    'req',
    '-x509',
    '-new',
    '-config',
    configFile,
    '-key',
    keyFile,
    '-days',
    '2',
    '-set_serial',
    `0x${randomSerial()}`,
    '-out',
    certFile,
  ]);
  return {
    name,
    certPem: readFileSync(certFile, 'utf8'),
    keyPem: readFileSync(keyFile, 'utf8'),
    certFile,
    keyFile,
    dir,
  };
}

export async function makeLeaf(ca: TestCa, options: LeafOptions): Promise<TestLeaf> {
  const dir = mkdtempSync(join(ca.dir, 'leaf-'));
  const keyFile = join(dir, 'leaf.key');
  const certFile = join(dir, 'leaf.crt');
  const csrFile = join(dir, 'leaf.csr');
  const reqConfig = join(dir, 'req.cnf');
  const extFile = join(dir, 'ext.cnf');
  const serial = randomSerial();
  const altNames = [
    ...(options.dnsNames ?? []).map((name) => `DNS:${configValue(name)}`),
    ...(options.ipAddresses ?? []).map((ip) => `IP:${configValue(ip)}`),
  ];
  writeFileSync(
    reqConfig,
    [
      '[req]',
      'prompt = no',
      'distinguished_name = dn',
      '[dn]',
      `CN = ${configValue(options.commonName)}`,
      '',
    ].join('\n'),
  );
  writeFileSync(
    extFile,
    [
      'basicConstraints = critical,CA:FALSE',
      'keyUsage = critical,digitalSignature,keyEncipherment',
      `extendedKeyUsage = ${options.client === true ? 'clientAuth' : 'serverAuth'}`,
      'subjectKeyIdentifier = hash',
      'authorityKeyIdentifier = keyid',
      ...(altNames.length > 0 ? [`subjectAltName = ${altNames.join(',')}`] : []),
      '',
    ].join('\n'),
  );
  await newKey(keyFile);
  await run(OPENSSL, ['req', '-new', '-config', reqConfig, '-key', keyFile, '-out', csrFile]);
  await run(OPENSSL, [
    'x509',
    '-req',
    '-in',
    csrFile,
    '-CA',
    ca.certFile,
    '-CAkey',
    ca.keyFile,
    '-set_serial',
    `0x${serial}`,
    '-days',
    String(options.days ?? 2),
    '-extfile',
    extFile,
    '-out',
    certFile,
  ]);
  return {
    certPem: readFileSync(certFile, 'utf8'),
    keyPem: readFileSync(keyFile, 'utf8'),
    certFile,
    keyFile,
    serialNumber: serial,
  };
}
