import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** Runs the demo as `make demo` does, and parses its summary line. */
function runDemo(mode: 'broker' | 'naive') {
  return new Promise<{ code: number | null; summary: Record<string, string>; output: string }>(
    (resolve, reject) => {
      const child = spawn(process.execPath, ['--import', 'tsx', 'scripts/demo.ts'], {
        cwd: ROOT,
        env: { PATH: process.env.PATH ?? '', MODE: mode, DEMO_SECONDS: '12', DEMO_AT_TTL: '3' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let output = '';
      child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`demo (${mode}) did not finish in 60 s:\n${output}`));
      }, 60_000);
      child.on('exit', (code) => {
        clearTimeout(timer);
        const line = output.split('\n').find((l) => l.startsWith('summary: '));
        if (!line) return reject(new Error(`no summary line in:\n${output}`));
        const summary = Object.fromEntries(
          line
            .slice('summary: '.length)
            .split(' ')
            .map((pair) => pair.split('=') as [string, string]),
        );
        resolve({ code, summary, output });
      });
    },
  );
}

describe('make demo', () => {
  it('broker mode: rotations go on and no resource call is rejected (exit 0)', async () => {
    const { code, summary } = await runDemo('broker');
    expect(summary.mode).toBe('broker');
    expect(Number(summary.rotations)).toBeGreaterThanOrEqual(3);
    expect(Number(summary.accepted)).toBeGreaterThan(0);
    expect(summary.rejected).toBe('0');
    expect(summary.reused_refresh_tokens).toBe('0');
    expect(code).toBe(0);
  }, 70_000);

  it('naive mode: modules racing on one refresh token break (exit 1), same summary format', async () => {
    const { code, summary } = await runDemo('naive');
    expect(summary.mode).toBe('naive');
    expect(Number(summary.rejected) > 0 || Number(summary.revoked_grants) > 0).toBe(true);
    expect(Object.keys(summary).sort()).toEqual(
      [
        'mode',
        'records',
        'accepted',
        'rejected',
        'idp_refreshes',
        'rotations',
        'invalid_grant',
        'reused_refresh_tokens',
        'revoked_grants',
      ].sort(),
    );
    expect(code).toBe(1);
  }, 70_000);
});
