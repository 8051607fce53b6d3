/**
 * Attribute names of our own spans, and the one way a user id appears in telemetry: hashed.
 * Token values never appear in any attribute, event or log line.
 */
import { createHash } from 'node:crypto';

export const ATTR = {
  tenant: 'tb.tenant',
  /** First 16 hex digits of SHA-256 of the user id: joins telemetry without naming the user. */
  userHash: 'tb.user_hash',
  replica: 'tb.replica',
  outcome: 'tb.outcome',
  generationFrom: 'tb.generation.from',
  generationTo: 'tb.generation.to',
  generation: 'tb.generation',
  lockWaitMs: 'tb.lock.wait_ms',
  idpLatencyMs: 'tb.idp.latency_ms',
  idp: 'tb.idp',
  demand: 'tb.demand',
  errorCode: 'tb.error_code',
} as const;

const hashes = new Map<string, string>();

export function userHash(user: string): string {
  let hash = hashes.get(user);
  if (hash === undefined) {
    hash = createHash('sha256').update(user).digest('hex').slice(0, 16);
    if (hashes.size >= 10_000) hashes.clear();
    hashes.set(user, hash);
  }
  return hash;
}
