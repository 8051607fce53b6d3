/**
 * One user of one tenant, and the rules every tenant and user id follows, for the broker (which
 * refuses bad ids in requests) and the sidecar (which refuses them in URLs and settings) alike.
 */
export interface SessionRef {
  readonly tenant: string;
  readonly user: string;
}

/** The longest tenant or user id. */
export const MAX_ID_LENGTH = 256;

/**
 * Why `value` is not an acceptable tenant or user id, or undefined when it is. `whenEmpty` words
 * the empty case for the caller (a missing request field "is required").
 */
export function idProblem(value: string, whenEmpty = 'must not be empty'): string | undefined {
  if (value === '') return whenEmpty;
  if (value.length > MAX_ID_LENGTH) return `must be at most ${MAX_ID_LENGTH} characters`;
  if (/[\u0000-\u001f\u007f]/.test(value)) return 'must not contain control characters';
  return undefined;
}

/** Map key of a session; control characters are not allowed in ids, so NUL cannot collide. */
export function sessionKey(tenant: string, user: string): string {
  return `${tenant}\u0000${user}`;
}
