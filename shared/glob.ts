/**
 * A glob of tenant, user, namespace or service-account names, for the broker's access policy and
 * the sidecar's allowed users alike: only `*` is special (any run of characters, none included).
 */
export function compileGlob(pattern: string): RegExp {
  const literal = pattern.split('*').map(escapeRegExp);
  // `s`: `*` also spans line breaks, so no character can slip past a pattern.
  return new RegExp(`^${literal.join('.*')}$`, 's');
}

/** A pattern matching exactly `value` (a listed id, where `*` is no wildcard). */
export function literalPattern(value: string): RegExp {
  return new RegExp(`^${escapeRegExp(value)}$`, 's');
}

function escapeRegExp(text: string): string {
  return text.replace(/[\\^$.|?*+()[\]{}]/g, '\\$&');
}
