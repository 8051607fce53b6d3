/**
 * RFC 6902 `add` as the API server applies an admission webhook's JSONPatch, on a copy: the test
 * sees the object Kubernetes would store. Any other op, or a path that does not exist, throws (the
 * API server would refuse the patch too).
 */
export interface AddOperation {
  op: string;
  path: string;
  value: unknown;
}

export function applyPatch<T>(document: T, patch: AddOperation[]): T {
  const root = structuredClone(document) as unknown;
  for (const operation of patch) {
    if (operation.op !== 'add') throw new Error(`unsupported op ${operation.op}`);
    const keys = operation.path
      .split('/')
      .slice(1)
      .map((k) => k.replace(/~1/g, '/').replace(/~0/g, '~'));
    const last = keys.pop();
    if (last === undefined) throw new Error('empty path');
    let target = root as Record<string, unknown> | unknown[];
    for (const key of keys) {
      const next = (target as Record<string, unknown>)[key];
      if (next === null || typeof next !== 'object')
        throw new Error(`${operation.path}: ${key} does not exist`);
      target = next as Record<string, unknown> | unknown[];
    }
    if (Array.isArray(target)) {
      const index = last === '-' ? target.length : Number(last);
      if (!Number.isInteger(index) || index < 0 || index > target.length)
        throw new Error(`${operation.path}: index out of range`);
      target.splice(index, 0, structuredClone(operation.value));
    } else target[last] = structuredClone(operation.value);
  }
  return root as T;
}
