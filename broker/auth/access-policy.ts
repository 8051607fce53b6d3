/**
 * The access policy: which callers (namespace/serviceaccount) may do what (verb) to which sessions
 * (tenant, user). Deny unless some rule allows. Parsed from YAML and validated strictly, so a typo
 * fails loudly with its line and field instead of silently granting or denying.
 *
 *   rules:
 *     - name: folio-modules                     # optional; appears in audit lines
 *       subjects: ["folio/mod-data-import"]     # namespace/serviceaccount, `*` globs per part
 *       verbs: [read, refresh]                  # enroll | read | refresh | revoke | list
 *       sessions:
 *         - tenant: diku                        # glob
 *           user: "*"                           # glob, defaults to "*"
 */
import {
  isAlias,
  isMap,
  isScalar,
  isSeq,
  LineCounter,
  parseDocument,
  type Document,
  type Node,
  type YAMLSeq,
} from 'yaml';
import { PolicyError } from '../errors.js';
import { compileGlob } from '../../shared/glob.js';

export const VERBS = ['enroll', 'read', 'refresh', 'revoke', 'list'] as const;
/** `read` covers GetToken and Watch. */
export type Verb = (typeof VERBS)[number];

export interface Caller {
  namespace: string;
  serviceAccount: string;
}

export interface SessionName {
  tenant: string;
  user: string;
}

interface SubjectPattern {
  namespace: RegExp;
  serviceAccount: RegExp;
}

interface SessionPattern {
  tenant: RegExp;
  user: RegExp;
}

interface CompiledRule {
  /** The rule's `name`, or `rules[i]` when it has none, so an audit line always names a rule. */
  name: string;
  subjects: SubjectPattern[];
  sessions: SessionPattern[];
}

export class AccessPolicy {
  readonly ruleCount: number;
  /** Rules indexed by verb, in file order: a check only looks at rules that grant its verb. */
  private readonly byVerb: ReadonlyMap<Verb, readonly CompiledRule[]>;

  private constructor(byVerb: Map<Verb, CompiledRule[]>, ruleCount: number) {
    this.byVerb = byVerb;
    this.ruleCount = ruleCount;
  }

  /** Parses and validates a policy document; `source` (the file name) starts every error message. */
  static parse(text: string, source: string): AccessPolicy {
    const rules = new PolicyReader(text, source).read();
    const byVerb = new Map<Verb, CompiledRule[]>(VERBS.map((verb) => [verb, []]));
    for (const { rule, verbs } of rules) for (const verb of verbs) byVerb.get(verb)!.push(rule);
    return new AccessPolicy(byVerb, rules.length);
  }

  allows(caller: Caller, verb: Verb, session: SessionName): boolean {
    return this.allowingRule(caller, verb, session) !== undefined;
  }

  /** The name of the first rule (in file order) that allows; undefined when denied. */
  allowingRule(caller: Caller, verb: Verb, session: SessionName): string | undefined {
    for (const rule of this.byVerb.get(verb) ?? []) {
      if (!matchesSubject(rule, caller)) continue;
      if (rule.sessions.some((s) => s.tenant.test(session.tenant) && s.user.test(session.user)))
        return rule.name;
    }
    return undefined;
  }

  /**
   * Whether the caller may list anything at all in `tenant` (in any tenant when undefined).
   * ListSessions answers PERMISSION_DENIED when not, and otherwise filters each session with
   * allows(caller, 'list', session).
   */
  mayListAny(caller: Caller, tenant?: string): boolean {
    return (this.byVerb.get('list') ?? []).some(
      (rule) =>
        matchesSubject(rule, caller) &&
        (tenant === undefined || rule.sessions.some((s) => s.tenant.test(tenant))),
    );
  }
}

function matchesSubject(rule: CompiledRule, caller: Caller): boolean {
  return rule.subjects.some(
    (s) => s.namespace.test(caller.namespace) && s.serviceAccount.test(caller.serviceAccount),
  );
}

export { compileGlob };

const RULE_KEYS = ['name', 'subjects', 'verbs', 'sessions'] as const;
const SESSION_KEYS = ['tenant', 'user'] as const;
const MAX_ECHO = 80;

type Mapping = Map<string, { node: Node | null; keyLine: number }>;

/** Walks the YAML node tree (not its JS value) so each problem can name its line. */
class PolicyReader {
  private readonly lines = new LineCounter();
  private readonly doc: Document.Parsed;

  constructor(
    private readonly text: string,
    private readonly source: string,
  ) {
    // Duplicate keys are found by mapping() below, which can name the field.
    this.doc = parseDocument(text, {
      lineCounter: this.lines,
      prettyErrors: false,
      uniqueKeys: false,
    });
  }

  read(): { rule: CompiledRule; verbs: Verb[] }[] {
    const problem = this.doc.errors[0] ?? this.doc.warnings[0];
    if (problem) {
      // An unquoted `*` reads as an (empty) alias: the one YAML mistake this format invites.
      const hint = problem.code === 'BAD_ALIAS' ? ' (quote a lone * as "*")' : '';
      throw new PolicyError(
        this.source,
        this.lines.linePos(problem.pos[0]).line,
        '',
        `is not valid YAML: ${problem.message}${hint}`,
      );
    }
    const root = this.doc.contents;
    if (!isMap(root))
      this.fail(root, 1, '(document)', 'must be a mapping with a `rules` list at its top');
    const top = this.mapping(root, '', ['rules']);
    const rulesEntry = top.get('rules');
    if (!rulesEntry) this.fail(root, 1, 'rules', 'is missing (write `rules: []` to deny all)');
    const rulesNode = this.seq(rulesEntry.node, rulesEntry.keyLine, 'rules', true);
    const names = new Map<string, string>();
    const rules = rulesNode.items.map((item, i) => {
      const compiled = this.rule(item as Node | null, this.line(rulesNode, 1), `rules[${i}]`);
      const first = names.get(compiled.rule.name);
      if (first !== undefined)
        this.fail(
          null,
          compiled.nameLine,
          `rules[${i}].name`,
          `${echo(compiled.rule.name)} is already the name of ${first}: audit lines must name one rule`,
        );
      names.set(compiled.rule.name, `rules[${i}]`);
      return compiled;
    });
    return rules;
  }

  private rule(node: Node | null, fallback: number, field: string) {
    const entry = this.mapping(node, field, RULE_KEYS, fallback);
    const line = this.line(node, fallback);
    const required = (key: string) => {
      const value = entry.get(key);
      if (!value) this.fail(node, line, `${field}.${key}`, 'is missing');
      return value;
    };

    const nameEntry = entry.get('name');
    const name = nameEntry
      ? this.string(nameEntry.node, nameEntry.keyLine, `${field}.name`)
      : field;

    const subjectsEntry = required('subjects');
    const subjectsNode = this.seq(subjectsEntry.node, subjectsEntry.keyLine, `${field}.subjects`);
    const subjects = subjectsNode.items.map((item, i) => {
      const at = `${field}.subjects[${i}]`;
      const text = this.string(item as Node | null, this.line(subjectsNode, line), at);
      const parts = text.split('/');
      if (parts.length !== 2 || parts[0] === '' || parts[1] === '')
        this.fail(
          item as Node,
          line,
          at,
          `${echo(text)} must be namespace/serviceaccount (exactly one "/", both parts non-empty)`,
        );
      return { namespace: compileGlob(parts[0]!), serviceAccount: compileGlob(parts[1]!) };
    });

    const verbsEntry = required('verbs');
    const verbsNode = this.seq(verbsEntry.node, verbsEntry.keyLine, `${field}.verbs`);
    const verbs = verbsNode.items.map((item, i) => {
      const at = `${field}.verbs[${i}]`;
      const text = this.string(item as Node | null, this.line(verbsNode, line), at);
      if (!(VERBS as readonly string[]).includes(text))
        this.fail(item as Node, line, at, `${echo(text)} is not a verb (${VERBS.join(', ')})`);
      return text as Verb;
    });

    const sessionsEntry = required('sessions');
    const sessionsNode = this.seq(sessionsEntry.node, sessionsEntry.keyLine, `${field}.sessions`);
    const sessions = sessionsNode.items.map((item, i) =>
      this.session(item as Node | null, this.line(sessionsNode, line), `${field}.sessions[${i}]`),
    );

    return { rule: { name, subjects, sessions }, verbs, nameLine: nameEntry?.keyLine ?? line };
  }

  private session(node: Node | null, fallback: number, field: string): SessionPattern {
    const entry = this.mapping(node, field, SESSION_KEYS, fallback);
    const tenant = entry.get('tenant');
    if (!tenant) this.fail(node, fallback, `${field}.tenant`, 'is missing');
    const user = entry.get('user');
    return {
      tenant: compileGlob(this.string(tenant.node, tenant.keyLine, `${field}.tenant`)),
      user: compileGlob(user ? this.string(user.node, user.keyLine, `${field}.user`) : '*'),
    };
  }

  /** A mapping's entries by key; unknown, duplicate and non-string keys are errors. */
  private mapping(
    node: Node | null,
    field: string,
    allowed: readonly string[],
    fallback = 1,
  ): Mapping {
    const map = this.resolve(node);
    if (!isMap(map)) this.fail(node, fallback, field, `must be a mapping (${allowed.join(', ')})`);
    const out: Mapping = new Map();
    for (const pair of map.items) {
      const keyNode = this.resolve(pair.key as Node | null);
      const keyLine = this.line(keyNode, this.line(map, fallback));
      const key = isScalar(keyNode) ? keyNode.value : undefined;
      const at = (name: string) => (field === '' ? name : `${field}.${name}`);
      if (typeof key !== 'string' || !allowed.includes(key))
        this.fail(
          keyNode,
          keyLine,
          at(typeof key === 'string' ? key : shown(key)),
          `is not a known key (${allowed.join(', ')})`,
        );
      const earlier = out.get(key);
      if (earlier)
        this.fail(keyNode, keyLine, at(key), `is given twice (first on line ${earlier.keyLine})`);
      out.set(key, { node: pair.value as Node | null, keyLine });
    }
    return out;
  }

  private seq(node: Node | null, fallback: number, field: string, mayBeEmpty = false): YAMLSeq {
    const seq = this.resolve(node);
    if (!isSeq(seq))
      this.fail(
        node,
        fallback,
        field,
        isScalar(seq) && seq.value === null ? 'is empty: it must be a list' : 'must be a list',
      );
    if (seq.items.length === 0 && !mayBeEmpty) this.fail(seq, fallback, field, 'must not be empty');
    return seq;
  }

  private string(node: Node | null, fallback: number, field: string): string {
    const scalar = this.resolve(node);
    const value = isScalar(scalar) ? scalar.value : undefined;
    if (typeof value !== 'string') {
      const what = !isScalar(scalar)
        ? 'must be a string'
        : value === null
          ? 'is empty'
          : `is a ${typeof value} (${shown(value)}); quote it if it is meant as text`;
      this.fail(node, fallback, field, what);
    }
    if (value === '') this.fail(node, fallback, field, 'must not be an empty string');
    return value;
  }

  /** Anchors and aliases are plain YAML; follow an alias to the node it names. */
  private resolve(node: Node | null | undefined): Node | null {
    if (!node) return null;
    return isAlias(node) ? ((node.resolve(this.doc) as Node | undefined) ?? null) : node;
  }

  private line(node: Node | null | undefined, fallback: number): number {
    const offset = node?.range?.[0];
    // An empty value (`verbs:`) sits at the end of its line or beyond the text: use the key's.
    if (offset === undefined || offset >= this.text.length) return fallback;
    return this.lines.linePos(offset).line;
  }

  private fail(
    node: Node | null | undefined,
    fallback: number,
    field: string,
    problem: string,
  ): never {
    throw new PolicyError(this.source, this.line(node, fallback), field, problem);
  }
}

/** A non-text scalar (number, boolean) as YAML wrote it; other values are not shown. */
function shown(value: unknown): string {
  return typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint'
    ? String(value)
    : '(not text)';
}

/** A value from the file, quoted and cut short: enough to find it, never a wall of text. */
function echo(value: string): string {
  return JSON.stringify(value.length > MAX_ECHO ? `${value.slice(0, MAX_ECHO)}…` : value);
}
