import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Caller } from '../../broker/auth/access-policy.js';
import { PolicyFile } from '../../broker/auth/policy-file.js';
import { ConfigError, PolicyError } from '../../broker/errors.js';

const importer: Caller = { namespace: 'folio', serviceAccount: 'mod-data-import' };
const session = { tenant: 'diku', user: 'alice' };

function policyFor(verb: string, tenant = 'diku'): string {
  return `rules:
  - name: ${verb}-rule
    subjects: [folio/mod-data-import]
    verbs: [${verb}]
    sessions:
      - tenant: ${tenant}
`;
}

interface LogLine {
  level: number;
  msg: string;
  [field: string]: unknown;
}

function capture() {
  const lines: LogLine[] = [];
  const log = pino(
    { level: 'debug' },
    { write: (s: string) => lines.push(JSON.parse(s) as LogLine) },
  );
  return { log, lines };
}

async function until(what: string, condition: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

let dir: string;
let stop: AbortController;
let running: Promise<void> | undefined;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'tb-policy-'));
  stop = new AbortController();
  running = undefined;
});

afterEach(async () => {
  stop.abort();
  await running;
  rmSync(dir, { recursive: true, force: true });
});

function start(file: PolicyFile): void {
  running = file.run(stop.signal);
}

describe('PolicyFile', () => {
  it('loads once at start-up and answers from current()', () => {
    const path = join(dir, 'policy.yaml');
    writeFileSync(path, policyFor('read'));
    const { log, lines } = capture();
    const file = new PolicyFile(path, { log });
    const loaded = file.load();
    expect(file.current()).toBe(loaded);
    expect(loaded.allows(importer, 'read', session)).toBe(true);
    expect(lines.find((l) => l.msg === 'access policy loaded')).toMatchObject({
      rules: 1,
      policyFile: path,
    });
  });

  it('refuses to start without a readable, valid file', () => {
    const { log } = capture();
    const missing = new PolicyFile(join(dir, 'absent.yaml'), { log });
    expect(() => missing.load()).toThrow(ConfigError);
    expect(() => missing.load()).toThrow(
      /^TB_POLICY_FILE .*absent\.yaml cannot be read \(ENOENT\)$/,
    );
    expect(() => missing.current()).toThrow(/before load/);

    const path = join(dir, 'policy.yaml');
    writeFileSync(path, policyFor('reed'));
    const err = (() => {
      try {
        new PolicyFile(path, { log }).load();
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(PolicyError);
    expect((err as PolicyError).line).toBe(4);
    expect((err as PolicyError).field).toBe('rules[0].verbs[0]');
    expect((err as PolicyError).message).toContain(`${path} line 4:`);
  });

  it('warns when the policy has no rules: everything is denied', () => {
    const path = join(dir, 'policy.yaml');
    writeFileSync(path, 'rules: []\n');
    const { log, lines } = capture();
    new PolicyFile(path, { log }).load();
    expect(lines.find((l) => l.level === 40)?.msg).toBe(
      'access policy has no rules: every call but health is denied',
    );
  });

  it('takes a rewritten file within seconds', async () => {
    const path = join(dir, 'policy.yaml');
    writeFileSync(path, policyFor('read'));
    const { log, lines } = capture();
    const file = new PolicyFile(path, { log, pollMs: 200 });
    file.load();
    start(file);
    writeFileSync(path, policyFor('refresh'));
    await until('the new policy', () => file.current().allows(importer, 'refresh', session));
    expect(file.current().allows(importer, 'read', session)).toBe(false);
    expect(lines.find((l) => l.msg === 'access policy reloaded')).toMatchObject({ rules: 1 });
  });

  it('follows a ConfigMap-style ..data symlink swap', async () => {
    // The layout kubelet makes: policy.yaml -> ..data/policy.yaml, ..data -> ..<timestamp>.
    mkdirSync(join(dir, '..2025_01_01_00_00_00.1'));
    writeFileSync(join(dir, '..2025_01_01_00_00_00.1', 'policy.yaml'), policyFor('read'));
    symlinkSync('..2025_01_01_00_00_00.1', join(dir, '..data'));
    symlinkSync('..data/policy.yaml', join(dir, 'policy.yaml'));
    const { log } = capture();
    // Default poll interval: the swap must be seen within seconds without any tuning.
    const file = new PolicyFile(join(dir, 'policy.yaml'), { log });
    file.load();
    start(file);

    mkdirSync(join(dir, '..2025_01_01_00_01_00.2'));
    writeFileSync(join(dir, '..2025_01_01_00_01_00.2', 'policy.yaml'), policyFor('enroll'));
    symlinkSync('..2025_01_01_00_01_00.2', join(dir, '..data_tmp'));
    renameSync(join(dir, '..data_tmp'), join(dir, '..data'));
    rmSync(join(dir, '..2025_01_01_00_00_00.1'), { recursive: true });

    await until('the swapped policy', () => file.current().allows(importer, 'enroll', session));
    expect(file.current().allows(importer, 'read', session)).toBe(false);
  });

  it('sees a change by polling where the directory watch cannot', async () => {
    // The watch follows `mounted` to a/, so swapping `mounted` to b/ fires no event there.
    mkdirSync(join(dir, 'a'));
    mkdirSync(join(dir, 'b'));
    writeFileSync(join(dir, 'a', 'policy.yaml'), policyFor('read'));
    writeFileSync(join(dir, 'b', 'policy.yaml'), policyFor('revoke'));
    symlinkSync('a', join(dir, 'mounted'));
    const { log } = capture();
    const file = new PolicyFile(join(dir, 'mounted', 'policy.yaml'), { log, pollMs: 200 });
    file.load();
    start(file);
    await new Promise((r) => setTimeout(r, 50));
    symlinkSync('b', join(dir, 'mounted.tmp'));
    renameSync(join(dir, 'mounted.tmp'), join(dir, 'mounted'));
    await until('the polled policy', () => file.current().allows(importer, 'revoke', session));
  });

  it('refuses a broken change, keeps the last good policy, and takes the next good one', async () => {
    const path = join(dir, 'policy.yaml');
    writeFileSync(path, policyFor('read'));
    const { log, lines } = capture();
    const file = new PolicyFile(path, { log, pollMs: 100 });
    const good = file.load();
    start(file);

    writeFileSync(path, policyFor('reed'));
    await until('the refusal', () => lines.some((l) => l.level === 50));
    const refusal = lines.find((l) => l.level === 50)!;
    expect(refusal).toMatchObject({ line: 4, field: 'rules[0].verbs[0]', rules: 1 });
    expect(refusal.msg).toContain('the last good policy stays in force');
    expect(refusal.msg).toContain(`${path} line 4: rules[0].verbs[0] "reed" is not a verb`);
    expect(file.current()).toBe(good);
    expect(file.current().allows(importer, 'read', session)).toBe(true);

    // The same broken content is judged once, not logged at every poll.
    await new Promise((r) => setTimeout(r, 500));
    expect(lines.filter((l) => l.level === 50)).toHaveLength(1);

    writeFileSync(path, policyFor('revoke'));
    await until('the fixed policy', () => file.current().allows(importer, 'revoke', session));
  });

  it('keeps the last good policy while the file is missing, and takes it back', async () => {
    const path = join(dir, 'policy.yaml');
    writeFileSync(path, policyFor('read'));
    const { log, lines } = capture();
    const file = new PolicyFile(path, { log, pollMs: 100 });
    file.load();
    start(file);

    rmSync(path);
    await until('the missing-file log', () => lines.some((l) => l.level === 50));
    expect(lines.find((l) => l.level === 50)?.msg).toBe(
      'access policy file cannot be read (ENOENT); the last good policy stays in force',
    );
    await new Promise((r) => setTimeout(r, 400));
    expect(lines.filter((l) => l.level === 50)).toHaveLength(1);
    expect(file.current().allows(importer, 'read', session)).toBe(true);

    writeFileSync(path, policyFor('list', 'college-*'));
    await until('the returned policy', () =>
      file.current().allows(importer, 'list', { tenant: 'college-a', user: 'u' }),
    );
    expect(lines.some((l) => l.msg === 'access policy file is readable again')).toBe(true);
  });

  it('stops promptly when aborted', async () => {
    const path = join(dir, 'policy.yaml');
    writeFileSync(path, policyFor('read'));
    const { log } = capture();
    const file = new PolicyFile(path, { log, pollMs: 60_000 });
    file.load();
    const run = file.run(stop.signal);
    await new Promise((r) => setTimeout(r, 50));
    const before = Date.now();
    stop.abort();
    await run;
    expect(Date.now() - before).toBeLessThan(1_000);
  });
});
