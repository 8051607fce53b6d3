import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../../broker/cli/tbctl.js';
import { brokerEnv, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import { devIdentity } from '../../scripts/dev/dev-identity.js';
import { startOidcProvider, type OidcProviderHarness } from '../../scripts/dev/oidc-provider.js';

let oidc: OidcProviderHarness;
let broker: Awaited<ReturnType<typeof startInProcessBroker>>;

beforeAll(async () => {
  oidc = await startOidcProvider({ accessTokenTtlSeconds: 2 });
  broker = await startInProcessBroker(brokerEnv(oidc));
});
afterAll(async () => {
  await broker?.stop();
  await oidc?.close();
});

/** Runs tbctl in this process, capturing its output. */
async function tbctl(...args: string[]) {
  let stdout = '';
  let stderr = '';
  const sink = (append: (s: string) => void) =>
    new Writable({
      write(chunk: Buffer, _enc, done) {
        append(chunk.toString());
        done();
      },
    });
  const code = await main(
    [
      '--broker',
      broker.address,
      // As an operator's shell in the cluster would: the broker's CA and a ServiceAccount token.
      '--ca-file',
      devIdentity().caFile,
      '--server-name',
      devIdentity().serverName,
      '--token-file',
      devIdentity().tokenFile('operator'),
      ...args,
    ],
    sink((s) => (stdout += s)),
    sink((s) => (stderr += s)),
  );
  return { code, stdout, stderr };
}

describe('tbctl', () => {
  it('enrolls, lists, shows, watches a rotation and revokes, never printing tokens unasked', async () => {
    const minted = await oidc.mintTokens('erin');
    const dir = mkdtempSync(join(tmpdir(), 'tbctl-'));
    const file = join(dir, 'rt');
    writeFileSync(file, minted.refresh_token, { mode: 0o600 });

    const enrolled = await tbctl('enroll', 'diku', 'erin', '--refresh-token-file', file);
    expect(enrolled.code).toBe(0);
    expect(enrolled.stdout).toMatch(/enrolled diku\/erin: generation 1, ACTIVE/);

    const list = await tbctl('--json', 'list', '--tenant', 'diku');
    expect(list.code).toBe(0);
    const sessions = JSON.parse(list.stdout) as { user: string; status: string }[];
    expect(sessions.map((s) => [s.user, s.status])).toEqual([['erin', 'ACTIVE']]);

    const shown = await tbctl('show', 'diku', 'erin');
    expect(shown.code).toBe(0);
    expect(shown.stdout).toMatch(/^generation: \d+$/m);

    const watched = await tbctl('--json', 'watch', 'diku', 'erin', '--count', '2');
    expect(watched.code).toBe(0);
    const events = watched.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { generation: number; status: string });
    expect(events).toHaveLength(2);
    expect(events[1]!.generation).toBeGreaterThan(events[0]!.generation);

    const hidden = await tbctl('token', 'diku', 'erin');
    expect(hidden.code).toBe(2);
    expect(hidden.stderr).toMatch(/--reveal/);
    const revealed = await tbctl('token', 'diku', 'erin', '--reveal');
    expect(revealed.code).toBe(0);
    const token = revealed.stdout.trim();
    expect(token.length).toBeGreaterThan(10);

    const revoked = await tbctl('revoke', 'diku', 'erin');
    expect(revoked.code).toBe(0);
    expect(revoked.stdout).toMatch(/revoked diku\/erin at generation \d+; revoked at the IdP too/);
    // Once more: the broker says the IdP was not asked again, and why.
    const again = await tbctl('revoke', 'diku', 'erin', '--json');
    expect(again.code).toBe(0);
    const answer = JSON.parse(again.stdout) as Record<string, unknown>;
    expect(answer).toMatchObject({ status: 'REVOKED', idpRevoked: false });
    expect(answer.idpRevokeProblem).toMatch(/^already revoked/);
    const after = await tbctl('token', 'diku', 'erin', '--reveal');
    expect(after.code).toBe(4);

    // Only the explicit --reveal call printed a token.
    for (const out of [enrolled, list, shown, watched, hidden, revoked, after])
      expect(out.stdout.includes(token) || out.stderr.includes(token)).toBe(false);
    expect(JSON.stringify([enrolled, list, shown, watched]).includes(minted.refresh_token)).toBe(
      false,
    );
  });

  it('gives clear errors and exit codes', async () => {
    expect((await tbctl('show', 'diku', 'nobody')).code).toBe(3);
    expect((await tbctl('enroll', 'diku', 'x')).code).toBe(2);
    const unknown = await tbctl('frobnicate');
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/unknown command "frobnicate"/);
    const down = await main(['--broker', '127.0.0.1:1', '--timeout', '500', 'list'], undefined, {
      write: () => true,
    } as unknown as NodeJS.WriteStream);
    expect(down).toBe(5);
  });

  it('runs as a command with --help', () => {
    const result = spawnSync('scripts/tbctl', ['--help'], { encoding: 'utf8' });
    expect(result.status).toBe(0);
    expect(result.stdout).toMatch(/Usage: tbctl/);
  });
});
