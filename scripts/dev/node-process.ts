/**
 * One of the project's entry points as a real child process, with the telemetry entry (which does
 * nothing unless OTEL_* ask): through tsx from the sources by default (tests need no build), or
 * `compiled`, what `npm start` and the image run (benchmarks; `make build` first): the entry's bundle
 * in dist/bin/ (scripts/bundle.ts) where it has one, else tsc's output in dist/.
 * Its stdout is read as pino JSON lines. Children still alive when the test process exits are
 * killed with SIGKILL.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BUNDLED_ENTRIES } from '../bundle.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const NODE_ARGS = ['--import', 'tsx', '--import', './shared/telemetry/register.ts'];
const COMPILED_NODE_ARGS = ['--import', './dist/shared/telemetry/register.js'];
/** The bundles scripts/bundle.ts writes, by the entry point they are made from. */
const BUNDLES: Readonly<Record<string, string>> = Object.fromEntries(
  Object.entries(BUNDLED_ENTRIES).map(([name, entry]) => [
    entry.replace(/\.js$/, '.ts'),
    `dist/bin/${name}.js`,
  ]),
);

/** The newest file of the sources dist/ is built from. */
function newestSource(): { file: string; mtimeMs: number } {
  let newest = { file: '', mtimeMs: 0 };
  for (const dir of ['broker', 'sidecar', 'webhook', 'shared', 'gen'])
    for (const entry of readdirSync(join(ROOT, dir), { recursive: true, withFileTypes: true })) {
      if (!entry.isFile()) continue;
      const path = join(entry.parentPath, entry.name);
      const { mtimeMs } = statSync(path);
      if (mtimeMs > newest.mtimeMs) newest = { file: relative(ROOT, path), mtimeMs };
    }
  return newest;
}

const checked = new Set<string>();
/**
 * A compiled run of stale or missing output would test yesterday's code: refuse it, saying why.
 * Only a bundle is compared with the sources: `make build` writes every bundle anew, while tsc
 * leaves an unchanged file's output as it was.
 */
function assertBuilt(file: string, bundle: boolean): void {
  if (checked.has(file)) return;
  const built = statSync(join(ROOT, file), { throwIfNoEntry: false });
  if (!built) throw new Error(`${file} does not exist: run \`make build\` first`);
  const newest = bundle ? newestSource() : undefined;
  if (newest && newest.mtimeMs > built.mtimeMs)
    throw new Error(`${file} is older than ${newest.file}: run \`make build\` first`);
  checked.add(file);
}

export interface SpawnOptions {
  /** Run the entry's bundle or dist/<entry>.js instead of the TypeScript source through tsx. */
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
  const compiled = BUNDLES[entry] ?? join('dist', entry.replace(/\.ts$/, '.js'));
  if (options.compiled) assertBuilt(compiled, entry in BUNDLES);
  const args = options.compiled ? [...COMPILED_NODE_ARGS, compiled] : [...NODE_ARGS, entry];
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
