/**
 * The one redaction step for text that leaves the process from a peer (an IdP's answer, a network
 * error) or from a configuration error. A hostile or buggy IdP may echo back whatever it was sent,
 * in any field: known secrets are replaced in every encoding they travel in, and anything shaped
 * like a credential is replaced whether or not it is known.
 */

const REDACTED = '[redacted]';

/** Shorter secrets are still matched literally, but not in their shifted base64 forms. */
const MIN_SHIFTED_CHARS = 6;

const SHAPES: readonly [RegExp, string][] = [
  // Authorization values: `Basic <base64>`, `Bearer <token>` and the other common schemes.
  [/\b(Basic|Bearer|Digest|Negotiate|NTLM|DPoP)(\s+)[\w.~+/=:-]+/gi, `$1$2${REDACTED}`],
  // A Cookie or Set-Cookie header (or field) carries values up to the end of its line or quote.
  [/\b((?:set-)?cookie)(\s*["']?\s*[:=]\s*["']?)[^"'\r\n]+/gi, `$1$2${REDACTED}`],
  // Named secrets in form, JSON, header or prose shape: `client_secret=…`, `"password": "…"`.
  [
    /\b(client[_-]?secret|password|passwd|pwd|secret|api[_-]?key|authorization|(?:access|refresh|id|subject|folio(?:access|refresh))[_-]?token|token)(\s*["']?\s*[:=]\s*["']?)(?!\[redacted\])[^\s"'&,;}]+/gi,
    `$1$2${REDACTED}`,
  ],
  // JWTs (JWS, and the first parts of a JWE).
  [/\beyJ[\w-]*\.[\w-]+(?:\.[\w-]*)*/g, REDACTED],
];

/**
 * Long opaque runs (base64, base64url, hex) that mix letters and digits are token-shaped; a run
 * that starts with a slash is a path or a URL's authority and is left for the reader.
 */
const OPAQUE_RUN = /[A-Za-z0-9+/_-]{24,}={0,2}/g;
const redactRun = (run: string): string =>
  !run.startsWith('/') && /\d/.test(run) && /[A-Za-z]/.test(run) ? REDACTED : run;

export interface RedactOptions {
  /** Longer results are cut (after redaction) and end in an ellipsis. */
  maxChars?: number;
}

export class Redactor {
  /** Every form a known secret may take, longest first so a longer form is replaced whole. */
  private readonly forms: readonly string[];
  private readonly known: readonly string[];

  constructor(secrets: readonly (string | undefined)[] = []) {
    this.known = secrets.filter((s): s is string => typeof s === 'string' && s !== '');
    const forms = new Set<string>();
    for (const secret of this.known) for (const form of encodingsOf(secret)) forms.add(form);
    this.forms = [...forms].sort((a, b) => b.length - a.length);
  }

  /** This redactor plus secrets known only for one call (the token sent, a login password). */
  with(...secrets: (string | undefined)[]): Redactor {
    return new Redactor([...this.known, ...secrets]);
  }

  redact(text: string, options: RedactOptions = {}): string {
    const max = options.maxChars;
    // A hostile answer may be huge; only its start can reach the result, with room for matches
    // that straddle the cut (forms are short, and a cut opaque run is still redacted by shape).
    let out =
      max !== undefined && text.length > 4 * max + 8192 ? text.slice(0, 4 * max + 8192) : text;
    for (const form of this.forms) out = out.replaceAll(form, REDACTED);
    for (const [shape, replacement] of SHAPES) out = out.replace(shape, replacement);
    out = out.replace(OPAQUE_RUN, redactRun);
    return max !== undefined && out.length > max ? `${out.slice(0, max)}…` : out;
  }
}

/** Redaction by shape only, for text where no secret is known (configuration errors). */
export const shapeRedactor = new Redactor();

/**
 * The forms a secret travels in: plain, URL- and form-encoded, JSON-escaped, and base64 and
 * base64url at each of the three byte alignments, so it is found inside a longer encoded value
 * too (`Basic base64(id:secret)`).
 */
function encodingsOf(secret: string): string[] {
  const forms = [
    secret,
    encodeURIComponent(secret),
    new URLSearchParams({ v: secret }).toString().slice(2),
    JSON.stringify(secret).slice(1, -1),
  ];
  const bytes = Buffer.from(secret, 'utf8');
  for (let shift = 0; shift < 3; shift++) {
    const padded = Buffer.concat([Buffer.alloc(shift), bytes]);
    // Only characters whose 6 bits all come from the secret: the neighbours are unknown.
    const from = Math.ceil((8 * shift) / 6);
    const to = Math.floor((8 * (shift + bytes.length)) / 6);
    for (const encoding of ['base64', 'base64url'] as const) {
      const text = padded.toString(encoding);
      const whole = shift === 0 ? [text, text.replace(/=+$/, '')] : [];
      const inner = text.slice(from, to);
      forms.push(...whole);
      if (inner.length >= MIN_SHIFTED_CHARS) forms.push(inner);
    }
  }
  return forms.filter((form) => form !== '');
}

/**
 * A thrown value's message for a log field. IdP errors are redacted where they are made; this
 * covers whatever else a call to a peer may throw (a library error quoting a header or a body).
 */
export function errorText(err: unknown): string {
  return shapeRedactor.redact(err instanceof Error ? err.message : String(err), { maxChars: 500 });
}
