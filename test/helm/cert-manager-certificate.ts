/**
 * A minimal model of cert-manager's Certificate (cert-manager.io/v1), in the shape of the
 * kubernetes-models classes (an `I<Kind>` interface and a class with validate()), because no
 * package of that family covers cert-manager. The interface lists every spec field of the CRD, so
 * the validator's walk reports a misspelt one; validate() checks what the CRD's OpenAPI schema and
 * cert-manager's admission webhook refuse for the fields a chart renders.
 */
import { ConfigMap, type IConfigMap } from 'kubernetes-models/v1/ConfigMap';

type Usage =
  | 'signing'
  | 'digital signature'
  | 'content commitment'
  | 'key encipherment'
  | 'key agreement'
  | 'data encipherment'
  | 'cert sign'
  | 'crl sign'
  | 'encipher only'
  | 'decipher only'
  | 'any'
  | 'server auth'
  | 'client auth'
  | 'code signing'
  | 'email protection'
  | 's/mime'
  | 'ipsec end system'
  | 'ipsec tunnel'
  | 'ipsec user'
  | 'timestamping'
  | 'ocsp signing'
  | 'microsoft sgc'
  | 'netscape sgc';

const USAGES: ReadonlySet<string> = new Set<Usage>([
  'signing',
  'digital signature',
  'content commitment',
  'key encipherment',
  'key agreement',
  'data encipherment',
  'cert sign',
  'crl sign',
  'encipher only',
  'decipher only',
  'any',
  'server auth',
  'client auth',
  'code signing',
  'email protection',
  's/mime',
  'ipsec end system',
  'ipsec tunnel',
  'ipsec user',
  'timestamping',
  'ocsp signing',
  'microsoft sgc',
  'netscape sgc',
]);

export interface ICertificateSpec {
  secretName: string;
  issuerRef: { name: string; kind?: string; group?: string };
  commonName?: string;
  dnsNames?: string[];
  ipAddresses?: string[];
  uris?: string[];
  emailAddresses?: string[];
  otherNames?: Array<{ oid?: string; utf8Value?: string }>;
  literalSubject?: string;
  subject?: Record<string, string[] | string>;
  duration?: string;
  renewBefore?: string;
  renewBeforePercentage?: number;
  isCA?: boolean;
  usages?: Usage[];
  privateKey?: {
    algorithm?: 'RSA' | 'ECDSA' | 'Ed25519';
    encoding?: 'PKCS1' | 'PKCS8';
    size?: number;
    rotationPolicy?: 'Never' | 'Always';
  };
  secretTemplate?: { annotations?: Record<string, string>; labels?: Record<string, string> };
  revisionHistoryLimit?: number;
  signatureAlgorithm?: string;
  encodeUsagesInRequest?: boolean;
  keystores?: Record<string, unknown>;
  additionalOutputFormats?: Array<{ type: 'DER' | 'CombinedPEM' }>;
  nameConstraints?: Record<string, unknown>;
}

export interface ICertificate {
  apiVersion: 'cert-manager.io/v1';
  kind: 'Certificate';
  metadata: IConfigMap['metadata'];
  spec: ICertificateSpec;
}

const DNS_NAME = /^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const GO_DURATION = /^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$/;
const isObject = (v: unknown): v is Record<string, unknown> =>
  v !== null && typeof v === 'object' && !Array.isArray(v);
const isStringList = (v: unknown): v is string[] =>
  Array.isArray(v) && v.every((item) => typeof item === 'string');

export class Certificate {
  constructor(private readonly data: unknown) {}

  /** Throws one Error naming every problem (`spec.issuerRef.name is required; ...`). */
  validate(): void {
    const problems = certificateProblems(this.data);
    if (problems.length > 0) throw new Error(problems.join('; '));
  }
}

function certificateProblems(data: unknown): string[] {
  if (!isObject(data)) return ['a Certificate must be an object'];
  const out: string[] = [];
  if (data.apiVersion !== 'cert-manager.io/v1') out.push('apiVersion must be cert-manager.io/v1');
  if (data.kind !== 'Certificate') out.push('kind must be Certificate');
  try {
    new ConfigMap({ metadata: data.metadata as IConfigMap['metadata'] }).validate();
  } catch (err) {
    out.push(`metadata: ${(err as Error).message}`);
  }
  const spec = data.spec;
  if (!isObject(spec)) return [...out, 'spec is required'];

  if (typeof spec.secretName !== 'string' || spec.secretName === '')
    out.push('spec.secretName is required');
  const issuer = spec.issuerRef;
  if (!isObject(issuer)) out.push('spec.issuerRef is required');
  else {
    if (typeof issuer.name !== 'string' || issuer.name === '')
      out.push('spec.issuerRef.name is required');
    for (const key of ['kind', 'group'] as const)
      if (issuer[key] !== undefined && typeof issuer[key] !== 'string')
        out.push(`spec.issuerRef.${key} must be a string`);
  }

  // The webhook refuses a certificate that names no subject at all.
  const subjects = ['commonName', 'dnsNames', 'ipAddresses', 'uris', 'emailAddresses'];
  if (!subjects.some((key) => spec[key] !== undefined) && spec.literalSubject === undefined)
    out.push(`spec needs one of ${subjects.join(', ')}`);
  if (spec.commonName !== undefined)
    if (typeof spec.commonName !== 'string' || spec.commonName.length > 64)
      out.push('spec.commonName must be a string of at most 64 characters');
  for (const key of ['dnsNames', 'ipAddresses', 'uris', 'emailAddresses'])
    if (spec[key] !== undefined && !isStringList(spec[key]))
      out.push(`spec.${key} must be a list of strings`);
  if (isStringList(spec.dnsNames))
    for (const name of spec.dnsNames)
      if (!DNS_NAME.test(name) || name.length > 253)
        out.push(`spec.dnsNames: ${JSON.stringify(name)} is not a DNS name`);

  for (const key of ['duration', 'renewBefore'])
    if (spec[key] !== undefined && (typeof spec[key] !== 'string' || !GO_DURATION.test(spec[key])))
      out.push(`spec.${key} must be a duration such as 2160h`);
  if (spec.isCA !== undefined && typeof spec.isCA !== 'boolean')
    out.push('spec.isCA must be a boolean');
  if (spec.usages !== undefined)
    if (!isStringList(spec.usages) || spec.usages.some((u) => !USAGES.has(u)))
      out.push(`spec.usages must be among ${[...USAGES].join(', ')}`);
  if (spec.revisionHistoryLimit !== undefined)
    if (!Number.isInteger(spec.revisionHistoryLimit) || (spec.revisionHistoryLimit as number) < 1)
      out.push('spec.revisionHistoryLimit must be an integer of at least 1');

  const key = spec.privateKey;
  if (key !== undefined) {
    if (!isObject(key)) out.push('spec.privateKey must be an object');
    else {
      const enums: Array<[string, string[]]> = [
        ['algorithm', ['RSA', 'ECDSA', 'Ed25519']],
        ['encoding', ['PKCS1', 'PKCS8']],
        ['rotationPolicy', ['Never', 'Always']],
      ];
      for (const [field, allowed] of enums)
        if (key[field] !== undefined && !allowed.includes(key[field] as string))
          out.push(`spec.privateKey.${field} must be one of ${allowed.join(', ')}`);
      if (key.size !== undefined) {
        const sizes: Record<string, (n: number) => boolean> = {
          RSA: (n) => n >= 2048 && n <= 8192,
          ECDSA: (n) => [256, 384, 521].includes(n),
          Ed25519: () => true,
        };
        const fits = sizes[(key.algorithm as string | undefined) ?? 'RSA'];
        if (!Number.isInteger(key.size) || (fits && !fits(key.size as number)))
          out.push(`spec.privateKey.size ${JSON.stringify(key.size)} does not fit the algorithm`);
      }
    }
  }

  const template = spec.secretTemplate;
  if (template !== undefined) {
    if (!isObject(template)) out.push('spec.secretTemplate must be an object');
    else
      for (const field of ['annotations', 'labels'])
        if (
          template[field] !== undefined &&
          !(
            isObject(template[field]) &&
            Object.values(template[field]).every((v) => typeof v === 'string')
          )
        )
          out.push(`spec.secretTemplate.${field} must map strings to strings`);
  }
  return out;
}
