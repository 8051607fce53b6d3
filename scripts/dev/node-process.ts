/**
 * One of the project's entry points as a real child process, with the telemetry entry (which does
 * nothing unless OTEL_* ask): through tsx from the sources by default (tests need no build), or
 * `compiled`, the JS in dist/ that `npm start` and the image run (benchmarks; `make build` first).
 * Its stdout is read as pino JSON lines. Children still alive when the test process exits are
 * killed with SIGKILL.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const NODE_ARGS = ['--import', 'tsx', '--import', './shared/telemetry/register.ts'];
const COMPILED_NODE_ARGS = ['--import', './dist/shared/telemetry/register.js'];

export interface SpawnOptions {
  /** Run dist/<entry>.js instead of the TypeScript source through tsx. */
  compiled?: boolean;
  /** Extra node flags before the entry (e.g. --max-old-space-size). */
  nodeFlags?: readonly string[];
}
const live = new Set<ChildProcess>();
process.on('exit', () => live.forEach((c) => c.kill('SIGKILL')));

export type LogEntry = Record<string, unknown>;

export interface NodeProcess {
  readonly child: ChildProcess;
  readonly exited: Promise<number | null>;
  /** Every JSON log line printed so far. */
  readonly logs: LogEntry[];
  /** Raw stdout and stderr so far. */
  output(): string;
  onLog(listener: (entry: LogEntry) => void): void;
  /** SIGTERM; resolves with the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL: a crash. */
  kill(): Promise<void>;
}

/** Spawns `entry` (relative to the repository) with only PATH and `env` in its environment. */
export function spawnNodeProcess(
  entry: string,
  env: Record<string, string>,
  options: SpawnOptions = {},
): NodeProcess {
  const args = options.compiled
    ? [...COMPILED_NODE_ARGS, join('dist', entry.replace(/\.ts$/, '.js'))]
    : [...NODE_ARGS, entry];
  const child = spawn(process.execPath, [...(options.nodeFlags ?? []), ...args], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  const logs: LogEntry[] = [];
  const listeners: ((entry: LogEntry) => void)[] = [];
  let text = '';
  let buffer = '';
  child.stderr.on('data', (chunk: Buffer) => (text += chunk.toString()));
  child.stdout.on('data', (chunk: Buffer) => {
    const s = chunk.toString();
    text += s;
    buffer += s;
    let newline;
    while ((newline = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      let entry: LogEntry;
      try {
        entry = JSON.parse(line) as LogEntry;
      } catch {
        continue;
      }
      logs.push(entry);
      listeners.forEach((l) => l(entry));
    }
  });
  const exited = new Promise<number | null>((resolve) =>
    child.on('exit', (code) => {
      live.delete(child);
      resolve(code);
    }),
  );
  return {
    child,
    exited,
    logs,
    output: () => text,
    onLog: (listener) => listeners.push(listener),
    stop: () => {
      child.kill('SIGTERM');
      return exited;
    },
    kill: async () => {
      child.kill('SIGKILL');
      await exited;
    },
  };
}

/**
 * Resolves with the first log line `ready` accepts; rejects if the process exits first or takes
 * longer than 20 s (then it is killed).
 */
export function waitForLog(proc: NodeProcess, name: string, ready: (entry: LogEntry) => boolean) {
  return new Promise<LogEntry>((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.child.kill('SIGKILL');
      reject(new Error(`${name} did not start in 20 s; output: ${proc.output().slice(-2000)}`));
    }, 20_000);
    proc.onLog((entry) => {
      if (!ready(entry)) return;
      clearTimeout(timer);
      resolve(entry);
    });
    void proc.exited.then((code) => {
      clearTimeout(timer);
      reject(
        new Error(`${name} exited with ${code} before serving: ${proc.output().slice(-2000)}`),
      );
    });
  });
}
