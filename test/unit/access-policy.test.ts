import { describe, expect, it } from 'vitest';
import { AccessPolicy, compileGlob, type Caller } from '../../broker/auth/access-policy.js';
import { PolicyError } from '../../broker/errors.js';

const importer: Caller = { namespace: 'folio', serviceAccount: 'mod-data-import' };
const diku = (user: string) => ({ tenant: 'diku', user });

function policy(text: string): AccessPolicy {
  return AccessPolicy.parse(text, 'policy.yaml');
}

function parseError(text: string): PolicyError {
  try {
    AccessPolicy.parse(text, 'policy.yaml');
  } catch (err) {
    expect(err).toBeInstanceOf(PolicyError);
    return err as PolicyError;
  }
  throw new Error('the policy parsed, but an error was expected');
}

describe('AccessPolicy matching', () => {
  it('allows an exact subject, verb and session, and nothing next to it', () => {
    const p = policy(`
rules:
  - name: importer
    subjects: [folio/mod-data-import]
    verbs: [read]
    sessions:
      - tenant: diku
        user: alice
`);
    expect(p.ruleCount).toBe(1);
    expect(p.allows(importer, 'read', diku('alice'))).toBe(true);
    expect(p.allowingRule(importer, 'read', diku('alice'))).toBe('importer');
    expect(p.allows(importer, 'read', diku('bob'))).toBe(false);
    expect(p.allows(importer, 'read', { tenant: 'other', user: 'alice' })).toBe(false);
    expect(
      p.allows({ namespace: 'folio', serviceAccount: 'mod-users' }, 'read', diku('alice')),
    ).toBe(false);
    expect(
      p.allows({ namespace: 'other', serviceAccount: 'mod-data-import' }, 'read', diku('alice')),
    ).toBe(false);
    // Literal matches are whole: no prefix or suffix slips through.
    expect(p.allows(importer, 'read', diku('alice2'))).toBe(false);
    expect(p.allows(importer, 'read', { tenant: 'xdiku', user: 'alice' })).toBe(false);
    expect(p.allowingRule(importer, 'read', diku('bob'))).toBeUndefined();
  });

  it('matches globs in the namespace and the serviceaccount part separately', () => {
    const p = policy(`
rules:
  - subjects: ["folio/*", "*/tbctl", "team-*/mod-*-import"]
    verbs: [read]
    sessions: [{ tenant: "*" }]
`);
    const s = diku('u');
    expect(p.allows({ namespace: 'folio', serviceAccount: 'anything' }, 'read', s)).toBe(true);
    expect(p.allows({ namespace: 'ops', serviceAccount: 'tbctl' }, 'read', s)).toBe(true);
    expect(p.allows({ namespace: 'team-a', serviceAccount: 'mod-data-import' }, 'read', s)).toBe(
      true,
    );
    // `*` may match nothing at all.
    expect(p.allows({ namespace: 'team-', serviceAccount: 'mod--import' }, 'read', s)).toBe(true);
    expect(p.allows({ namespace: 'team-a', serviceAccount: 'mod-data-export' }, 'read', s)).toBe(
      false,
    );
    expect(p.allows({ namespace: 'folio2', serviceAccount: 'x' }, 'read', s)).toBe(false);
    // A glob never crosses from one part into the other.
    expect(p.allows({ namespace: 'ops', serviceAccount: 'x/tbctl' }, 'read', s)).toBe(false);
  });

  it('treats every character but * literally', () => {
    const glob = compileGlob('a.b+c(d)[e]?^$|\\{2}');
    expect(glob.test('a.b+c(d)[e]?^$|\\{2}')).toBe(true);
    expect(glob.test('aXb+c(d)[e]?^$|\\{2}')).toBe(false);
    expect(compileGlob('mod-*').test('mod-\nx')).toBe(true);
    expect(compileGlob('*').test('')).toBe(true);
    const p = policy(`
rules:
  - subjects: [folio/mod.x]
    verbs: [read]
    sessions: [{ tenant: "t.1", user: "a+b" }]
`);
    const modx = { namespace: 'folio', serviceAccount: 'mod.x' };
    expect(p.allows(modx, 'read', { tenant: 't.1', user: 'a+b' })).toBe(true);
    expect(
      p.allows({ namespace: 'folio', serviceAccount: 'modAx' }, 'read', {
        tenant: 't.1',
        user: 'a+b',
      }),
    ).toBe(false);
    expect(p.allows(modx, 'read', { tenant: 'tX1', user: 'a+b' })).toBe(false);
    expect(p.allows(modx, 'read', { tenant: 't.1', user: 'aab' })).toBe(false);
  });

  it('keeps verbs apart: a rule grants only the verbs it lists', () => {
    const p = policy(`
rules:
  - subjects: [folio/mod-data-import]
    verbs: [read, refresh]
    sessions: [{ tenant: diku }]
`);
    expect(p.allows(importer, 'read', diku('u'))).toBe(true);
    expect(p.allows(importer, 'refresh', diku('u'))).toBe(true);
    for (const verb of ['enroll', 'revoke', 'list'] as const)
      expect(p.allows(importer, verb, diku('u'))).toBe(false);
  });

  it('matches tenant and user patterns, with user defaulting to "*"', () => {
    const p = policy(`
rules:
  - name: any-user-in-diku
    subjects: [folio/mod-data-import]
    verbs: [read]
    sessions:
      - tenant: diku
  - name: system-users-anywhere
    subjects: [folio/mod-data-import]
    verbs: [enroll]
    sessions:
      - tenant: "college-*"
        user: "system-*"
      - tenant: diku
        user: admin
`);
    expect(p.allowingRule(importer, 'read', diku('whoever'))).toBe('any-user-in-diku');
    expect(p.allows(importer, 'read', { tenant: 'college-a', user: 'x' })).toBe(false);
    expect(p.allowingRule(importer, 'enroll', { tenant: 'college-a', user: 'system-etl' })).toBe(
      'system-users-anywhere',
    );
    expect(p.allows(importer, 'enroll', { tenant: 'college-a', user: 'alice' })).toBe(false);
    expect(p.allows(importer, 'enroll', diku('admin'))).toBe(true);
    expect(p.allows(importer, 'enroll', diku('system-etl'))).toBe(false);
  });

  it('names the first allowing rule in file order, and an unnamed rule by its index', () => {
    const p = policy(`
rules:
  - subjects: [folio/mod-data-import]
    verbs: [read]
    sessions: [{ tenant: diku, user: alice }]
  - name: broad
    subjects: ["folio/*"]
    verbs: [read]
    sessions: [{ tenant: "*" }]
`);
    expect(p.allowingRule(importer, 'read', diku('alice'))).toBe('rules[0]');
    expect(p.allowingRule(importer, 'read', diku('bob'))).toBe('broad');
  });

  it('denies everything by default, and with an empty rules list', () => {
    const p = policy('rules: []\n');
    expect(p.ruleCount).toBe(0);
    for (const verb of ['enroll', 'read', 'refresh', 'revoke', 'list'] as const)
      expect(p.allows(importer, verb, diku('alice'))).toBe(false);
    expect(p.mayListAny(importer)).toBe(false);
  });

  it('says whether a caller may list anything, in one tenant or in any', () => {
    const p = policy(`
rules:
  - subjects: [ops/tbctl]
    verbs: [list]
    sessions: [{ tenant: "college-*", user: "system-*" }]
  - subjects: [folio/mod-data-import]
    verbs: [read]
    sessions: [{ tenant: "*" }]
`);
    const tbctl = { namespace: 'ops', serviceAccount: 'tbctl' };
    expect(p.mayListAny(tbctl)).toBe(true);
    expect(p.mayListAny(tbctl, 'college-a')).toBe(true);
    expect(p.mayListAny(tbctl, 'diku')).toBe(false);
    // ListSessions then filters each session.
    expect(p.allows(tbctl, 'list', { tenant: 'college-a', user: 'system-etl' })).toBe(true);
    expect(p.allows(tbctl, 'list', { tenant: 'college-a', user: 'alice' })).toBe(false);
    // Another verb over every tenant does not make a lister.
    expect(p.mayListAny(importer)).toBe(false);
    expect(p.mayListAny(importer, 'diku')).toBe(false);
  });

  it('follows YAML anchors and aliases', () => {
    const p = policy(`
rules:
  - subjects: &modules ["folio/mod-*"]
    verbs: [read]
    sessions: &diku [{ tenant: diku }]
  - subjects: *modules
    verbs: [refresh]
    sessions: *diku
`);
    expect(p.allows(importer, 'refresh', diku('u'))).toBe(true);
    expect(p.allows(importer, 'refresh', { tenant: 'x', user: 'u' })).toBe(false);
  });
});

describe('AccessPolicy validation', () => {
  const good = (extra = '') => `rules:
  - name: ok
    subjects: [folio/mod-x]
    verbs: [read]
    sessions:
      - tenant: diku
${extra}`;

  it('names the source, line and field of an unknown verb', () => {
    const err = parseError(`rules:
  - name: first
    subjects: [folio/mod-x]
    verbs: [read]
    sessions: [{ tenant: diku }]
  - subjects: [folio/mod-y]
    verbs: [reed]
    sessions: [{ tenant: diku }]
`);
    expect(err.message).toBe(
      'policy.yaml line 7: rules[1].verbs[0] "reed" is not a verb (enroll, read, refresh, revoke, list)',
    );
    expect(err.code).toBe('POLICY_INVALID');
    expect(err.line).toBe(7);
    expect(err.field).toBe('rules[1].verbs[0]');
  });

  const cases: { what: string; text: string; line: number; field: string; problem: string }[] = [
    {
      what: 'an unknown top-level key',
      text: 'rules: []\nrulez: []\n',
      line: 2,
      field: 'rulez',
      problem: 'is not a known key (rules)',
    },
    {
      what: 'an unknown rule key',
      text: good('    verb: [read]\n'),
      line: 7,
      field: 'rules[0].verb',
      problem: 'is not a known key (name, subjects, verbs, sessions)',
    },
    {
      what: 'an unknown session key',
      text: good('        users: alice\n'),
      line: 7,
      field: 'rules[0].sessions[0].users',
      problem: 'is not a known key (tenant, user)',
    },
    {
      what: 'subjects that are not a list',
      text: 'rules:\n  - subjects: folio/mod-x\n    verbs: [read]\n    sessions: [{ tenant: t }]\n',
      line: 2,
      field: 'rules[0].subjects',
      problem: 'must be a list',
    },
    {
      what: 'an empty verbs value',
      text: 'rules:\n  - subjects: [a/b]\n    verbs:\n    sessions: [{ tenant: t }]\n',
      line: 3,
      field: 'rules[0].verbs',
      problem: 'is empty: it must be a list',
    },
    {
      what: 'a number where a name belongs',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: [read]\n    sessions:\n      - tenant: 42\n',
      line: 5,
      field: 'rules[0].sessions[0].tenant',
      problem: 'is a number (42); quote it if it is meant as text',
    },
    {
      what: 'a list where a name belongs',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: [read]\n    sessions:\n      - tenant: t\n        user: [a]\n',
      line: 6,
      field: 'rules[0].sessions[0].user',
      problem: 'must be a string',
    },
    {
      what: 'an empty string pattern',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: [read]\n    sessions:\n      - tenant: ""\n',
      line: 5,
      field: 'rules[0].sessions[0].tenant',
      problem: 'must not be an empty string',
    },
    {
      what: 'a name that is not text',
      text: 'rules:\n  - name: true\n    subjects: [a/b]\n    verbs: [read]\n    sessions: [{ tenant: t }]\n',
      line: 2,
      field: 'rules[0].name',
      problem: 'is a boolean (true); quote it if it is meant as text',
    },
    {
      what: 'an empty subjects list',
      text: 'rules:\n  - subjects: []\n    verbs: [read]\n    sessions: [{ tenant: t }]\n',
      line: 2,
      field: 'rules[0].subjects',
      problem: 'must not be empty',
    },
    {
      what: 'an empty verbs list',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: []\n    sessions: [{ tenant: t }]\n',
      line: 3,
      field: 'rules[0].verbs',
      problem: 'must not be empty',
    },
    {
      what: 'an empty sessions list',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: [read]\n    sessions: []\n',
      line: 4,
      field: 'rules[0].sessions',
      problem: 'must not be empty',
    },
    {
      what: 'a missing sessions key',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: [read]\n',
      line: 2,
      field: 'rules[0].sessions',
      problem: 'is missing',
    },
    {
      what: 'a session without a tenant',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: [read]\n    sessions:\n      - user: alice\n',
      line: 5,
      field: 'rules[0].sessions[0].tenant',
      problem: 'is missing',
    },
    {
      what: 'a subject without a "/"',
      text: 'rules:\n  - subjects:\n      - folio/ok\n      - mod-x\n    verbs: [read]\n    sessions: [{ tenant: t }]\n',
      line: 4,
      field: 'rules[0].subjects[1]',
      problem: '"mod-x" must be namespace/serviceaccount (exactly one "/", both parts non-empty)',
    },
    {
      what: 'a subject with two "/"',
      text: 'rules:\n  - subjects: [a/b/c]\n    verbs: [read]\n    sessions: [{ tenant: t }]\n',
      line: 2,
      field: 'rules[0].subjects[0]',
      problem: '"a/b/c" must be namespace/serviceaccount (exactly one "/", both parts non-empty)',
    },
    {
      what: 'a subject with an empty part',
      text: 'rules:\n  - subjects: ["folio/"]\n    verbs: [read]\n    sessions: [{ tenant: t }]\n',
      line: 2,
      field: 'rules[0].subjects[0]',
      problem: '"folio/" must be namespace/serviceaccount (exactly one "/", both parts non-empty)',
    },
    {
      what: 'a duplicate key',
      text: 'rules:\n  - subjects: [a/b]\n    verbs: [read]\n    sessions: [{ tenant: t }]\n    verbs: [enroll]\n',
      line: 5,
      field: 'rules[0].verbs',
      problem: 'is given twice (first on line 3)',
    },
    {
      what: 'two rules with one name',
      text: good(
        '  - name: ok\n    subjects: [a/b]\n    verbs: [list]\n    sessions: [{ tenant: t }]\n',
      ),
      line: 7,
      field: 'rules[1].name',
      problem: '"ok" is already the name of rules[0]: audit lines must name one rule',
    },
    {
      what: 'a rule that is not a mapping',
      text: 'rules:\n  - folio/mod-x\n',
      line: 2,
      field: 'rules[0]',
      problem: 'must be a mapping (name, subjects, verbs, sessions)',
    },
    {
      what: 'a list as the root',
      text: '- rules: []\n',
      line: 1,
      field: '(document)',
      problem: 'must be a mapping with a `rules` list at its top',
    },
    {
      what: 'an empty file',
      text: '',
      line: 1,
      field: '(document)',
      problem: 'must be a mapping with a `rules` list at its top',
    },
    {
      what: 'a root without rules',
      text: '{}\n',
      line: 1,
      field: 'rules',
      problem: 'is missing (write `rules: []` to deny all)',
    },
    {
      what: 'rules: with no value',
      text: '# policy\nrules:\n',
      line: 2,
      field: 'rules',
      problem: 'is empty: it must be a list',
    },
  ];

  for (const c of cases)
    it(`refuses ${c.what}`, () => {
      const err = parseError(c.text);
      expect(err.message).toBe(`policy.yaml line ${c.line}: ${c.field} ${c.problem}`);
      expect(err.line).toBe(c.line);
      expect(err.field).toBe(c.field);
    });

  it('refuses invalid YAML with its line, and hints at an unquoted *', () => {
    const syntax = parseError('rules:\n  - subjects: [a/b\n');
    expect(syntax.message).toMatch(/^policy\.yaml line \d+: is not valid YAML: /);
    expect(syntax.field).toBe('');

    const star = parseError(
      'rules:\n  - subjects: [a/b]\n    verbs: [read]\n    sessions:\n      - tenant: t\n        user: *\n',
    );
    expect(star.line).toBe(6);
    expect(star.message).toContain('(quote a lone * as "*")');

    const docs = parseError('rules: []\n---\nrules: []\n');
    expect(docs.line).toBe(2);
    expect(docs.message).toContain('is not valid YAML');

    const tag = parseError('rules: !!set []\n');
    expect(tag.line).toBe(1);
  });

  it('refuses a long value without echoing all of it', () => {
    const long = 'x'.repeat(500);
    const err = parseError(
      `rules:\n  - subjects: [a/b]\n    verbs: [${long}]\n    sessions: [{ tenant: t }]\n`,
    );
    expect(err.message.length).toBeLessThan(200);
    expect(err.line).toBe(3);
  });
});
