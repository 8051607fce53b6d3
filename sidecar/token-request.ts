import { InvalidParameterError } from './errors.js';
import { idProblem, MAX_ID_LENGTH, type SessionRef } from '../shared/session-ref.js';

export const TOKEN_PATH_PREFIX = '/v1/tokens/';

/** Without a `wait` parameter a read waits this long (capped by the configured maximum). */
export const DEFAULT_WAIT_MS = 5_000;
/** The largest `wait` accepted before capping (setTimeout's limit); larger is an error. */
export const MAX_WAIT_PARAMETER_MS = 2_147_483_647;

export interface TokenRequest extends SessionRef {
  /** Milliseconds, already capped. */
  waitMs: number;
  /** Serve only this generation or newer; 0 for any. */
  minGeneration: number;
}

/**
 * Parses `/v1/tokens/{tenant}/{user}?wait=&min_generation=` (path after the prefix, and the raw
 * query). Every problem names the parameter, so a module author sees what to fix.
 */
export function parseTokenRequest(rest: string, query: string, maxWaitMs: number): TokenRequest {
  const slash = rest.indexOf('/');
  if (slash < 0 || rest.indexOf('/', slash + 1) >= 0)
    throw new InvalidParameterError('path', 'must be /v1/tokens/{tenant}/{user}');
  const tenant = pathSegment('tenant', rest.slice(0, slash));
  const user = pathSegment('user', rest.slice(slash + 1));

  let waitMs = Math.min(DEFAULT_WAIT_MS, maxWaitMs);
  let minGeneration = 0;
  const seen = new Set<string>();
  for (const pair of query === '' ? [] : query.split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const name = eq < 0 ? pair : pair.slice(0, eq);
    const value = eq < 0 ? '' : pair.slice(eq + 1);
    if (seen.has(name))
      throw new InvalidParameterError(shortName(name), 'must be given at most once');
    seen.add(name);
    if (name === 'wait') {
      if (!/^\d{1,10}$/.test(value) || Number(value) > MAX_WAIT_PARAMETER_MS)
        throw new InvalidParameterError(
          'wait',
          `must be a whole number of milliseconds from 0 to ${MAX_WAIT_PARAMETER_MS} (values above ${maxWaitMs} are capped), got ${JSON.stringify(value.slice(0, 40))}`,
        );
      waitMs = Math.min(Number(value), maxWaitMs);
    } else if (name === 'min_generation') {
      if (!/^\d{1,15}$/.test(value))
        throw new InvalidParameterError(
          'min_generation',
          `must be a whole number (a generation), got ${JSON.stringify(value.slice(0, 40))}`,
        );
      minGeneration = Number(value);
    } else {
      throw new InvalidParameterError(
        shortName(name),
        'is not a parameter of this route (known: wait, min_generation)',
      );
    }
  }
  return { tenant, user, waitMs, minGeneration };
}

/** Parsed URLs kept per user the sidecar may hold (TB_SIDECAR_MAX_USERS), and at least MIN. */
const CACHED_PER_USER = 4;
const CACHED_MIN = 1_024;
/** Longer URLs are parsed at every read, never kept, so the cache's memory stays bounded. */
const CACHED_URL_MAX_LENGTH = 256;

/**
 * Parsed token URLs: a module reads the same few URLs per user over and over. Bounded by the
 * users the sidecar may hold; when full the oldest entry goes, one at a time, so reading more
 * distinct URLs than the bound costs a parse per read instead of emptying the cache (a cliff).
 * Only URLs that parse are kept: a bad one throws again at every read.
 */
export class TokenRequestCache {
  private readonly parsed = new Map<string, TokenRequest>();
  readonly capacity: number;

  constructor(
    private readonly maxWaitMs: number,
    maxUsers: number,
  ) {
    this.capacity = Math.max(CACHED_MIN, CACHED_PER_USER * maxUsers);
  }

  get size(): number {
    return this.parsed.size;
  }

  /** `rest`: the path after TOKEN_PATH_PREFIX; `query`: the raw query without '?'. */
  get(rest: string, query: string): TokenRequest {
    if (rest.length + query.length > CACHED_URL_MAX_LENGTH)
      return parseTokenRequest(rest, query, this.maxWaitMs);
    // A path never holds '?' (the query starts at the first), so the key is unambiguous.
    const key = query === '' ? rest : `${rest}?${query}`;
    let request = this.parsed.get(key);
    if (!request) {
      request = parseTokenRequest(rest, query, this.maxWaitMs);
      if (this.parsed.size >= this.capacity) this.parsed.delete(this.parsed.keys().next().value!);
      this.parsed.set(key, request);
    }
    return request;
  }
}

function pathSegment(name: 'tenant' | 'user', raw: string): string {
  // Checked before decoding too, so a huge segment is not decoded just to be refused. A UTF-16
  // unit is at most 3 bytes of UTF-8, each %XX: a valid id of 256 "ü" is 1,536 characters here.
  if (raw.length > 9 * MAX_ID_LENGTH)
    throw new InvalidParameterError(name, `must be at most ${MAX_ID_LENGTH} characters`);
  let value: string;
  try {
    value = decodeURIComponent(raw);
  } catch {
    throw new InvalidParameterError(name, 'is not valid percent-encoding');
  }
  const problem = idProblem(value);
  if (problem) throw new InvalidParameterError(name, problem);
  return value;
}

function shortName(name: string): string {
  return `query parameter ${JSON.stringify(name.slice(0, 40))}`;
}
