/**
 * Certificates made at test time with the system `openssl`, each in its own temp dir:
 *
 *   const ca = await makeCa('test-ca');
 *   const leaf = await makeLeaf(ca, { commonName: 'broker', ipAddresses: ['127.0.0.1'] });
 *   https.createServer({ cert: leaf.certPem, key: leaf.keyPem });   // clients trust ca.certPem
 *   await leaf.cleanup(); await ca.cleanup();
 *
 * Keys are EC P-256 (fast to make). A leaf is good for both serverAuth and clientAuth, so one
 * helper serves TLS servers and mTLS clients. Certificates are valid for two days from now.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface TestCertificate {
  readonly certPem: string;
  readonly keyPem: string;
  readonly certFile: string;
  readonly keyFile: string;
  /** The temp dir holding the files. */
  readonly dir: string;
  cleanup(): Promise<void>;
}

export interface TestCa extends TestCertificate {
  readonly name: string;
}

export interface LeafNames {
  commonName: string;
  dnsNames?: readonly string[];
  ipAddresses?: readonly string[];
}

async function openssl(args: readonly string[], cwd: string): Promise<void> {
  try {
    await run('openssl', args, { cwd });
  } catch (err) {
    const stderr = (err as { stderr?: string }).stderr ?? '';
    throw new Error(`openssl ${args[0]} failed: ${stderr.trim() || String(err)}`);
  }
}

async function newDir(label: string): Promise<string> {
  return mkdtemp(join(tmpdir(), `tb-cert-${label.replace(/[^A-Za-z0-9-]/g, '-')}-`));
}

async function genKey(dir: string, file: string): Promise<void> {
  await openssl(
    ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', file],
    dir,
  );
}

async function loaded(dir: string, certFile: string, keyFile: string): Promise<TestCertificate> {
  const [certPem, keyPem] = await Promise.all([
    readFile(certFile, 'utf8'),
    readFile(keyFile, 'utf8'),
  ]);
  return {
    certPem,
    keyPem,
    certFile,
    keyFile,
    dir,
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

/** A self-signed CA that may sign leaves (and nothing else: pathlen 0). */
export async function makeCa(name: string): Promise<TestCa> {
  const dir = await newDir(name);
  const keyFile = join(dir, 'ca.key');
  const certFile = join(dir, 'ca.crt');
  await genKey(dir, keyFile);
  await openssl(
    [
      'req',
      '-x509',
      '-new',
      '-key',
      keyFile,
      '-subj',
      `/CN=${name}`,
      '-days',
      '2',
      '-addext',
      'basicConstraints=critical,CA:TRUE,pathlen:0',
      '-addext',
      'keyUsage=critical,keyCertSign,cRLSign',
      '-addext',
      'subjectKeyIdentifier=hash',
      '-out',
      certFile,
    ],
    dir,
  );
  return { name, ...(await loaded(dir, certFile, keyFile)) };
}

/** A leaf signed by `ca` with the given subject alternative names. */
export async function makeLeaf(ca: TestCa, names: LeafNames): Promise<TestCertificate> {
  const dir = await newDir(names.commonName);
  const keyFile = join(dir, 'leaf.key');
  const csrFile = join(dir, 'leaf.csr');
  const certFile = join(dir, 'leaf.crt');
  const extFile = join(dir, 'leaf.ext');
  const sans = [
    ...(names.dnsNames ?? []).map((n) => `DNS:${n}`),
    ...(names.ipAddresses ?? []).map((ip) => `IP:${ip}`),
  ];
  await genKey(dir, keyFile);
  await openssl(
    ['req', '-new', '-key', keyFile, '-subj', `/CN=${names.commonName}`, '-out', csrFile],
    dir,
  );
  await writeFile(
    extFile,
    [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth,clientAuth',
      'authorityKeyIdentifier=keyid',
      ...(sans.length > 0 ? [`subjectAltName=${sans.join(',')}`] : []),
      '',
    ].join('\n'),
  );
  await openssl(
    [
      'x509',
      '-req',
      '-in',
      csrFile,
      '-CA',
      ca.certFile,
      '-CAkey',
      ca.keyFile,
      '-set_serial',
      `0x${randomBytes(8).toString('hex')}`,
      '-days',
      '2',
      '-extfile',
      extFile,
      '-out',
      certFile,
    ],
    dir,
  );
  return loaded(dir, certFile, keyFile);
}
