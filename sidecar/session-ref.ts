/** One user of one tenant, as the sidecar names it. */
export interface SessionRef {
  readonly tenant: string;
  readonly user: string;
}

/** The broker's limit for tenant and user ids. */
export const MAX_ID_LENGTH = 256;

/** Why `value` is not an acceptable tenant or user id, or undefined when it is. */
export function idProblem(value: string): string | undefined {
  if (value === '') return 'must not be empty';
  if (value.length > MAX_ID_LENGTH) return `must be at most ${MAX_ID_LENGTH} characters`;
  if (/[\u0000-\u001f\u007f]/.test(value)) return 'must not contain control characters';
  return undefined;
}

/** Map key of a session; control characters are not allowed in ids, so NUL cannot collide. */
export function sessionKey(tenant: string, user: string): string {
  return `${tenant}\u0000${user}`;
}
