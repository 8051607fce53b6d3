import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
/** As `npm start` runs it: the telemetry entry first (it does nothing unless OTEL_* ask). */
export const NODE_ARGS = ['--import', 'tsx', '--import', './shared/telemetry/register.ts'];
const live = new Set<ChildProcess>();
process.on('exit', () => live.forEach((c) => c.kill('SIGKILL')));

export interface BrokerProcess {
  readonly port: number;
  readonly address: string;
  readonly pid: number;
  /** Every log line the broker printed (JSON objects). */
  readonly logs: Record<string, unknown>[];
  /** SIGTERM and wait for the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL: a crash. */
  kill(): Promise<void>;
}

/**
 * Starts `broker/main.ts` as a separate Node.js process (real replica) with `env` on top of a
 * minimal environment (so telemetry is off unless `env` asks); resolves once it logs its bound port.
 */
export function startBrokerProcess(env: Record<string, string>): Promise<BrokerProcess> {
  const child = spawn(process.execPath, [...NODE_ARGS, 'broker/main.ts'], {
    cwd: ROOT,
    // Info level at least: the harness learns the bound port from the 'broker serving' line.
    env: {
      PATH: process.env.PATH ?? '',
      TB_GRPC_ADDRESS: '127.0.0.1:0',
      ...env,
      TB_LOG_LEVEL: 'info',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  const logs: Record<string, unknown>[] = [];
  let stderr = '';
  const exited = new Promise<number | null>((resolve) =>
    child.on('exit', (code) => {
      live.delete(child);
      resolve(code);
    }),
  );
  return new Promise((resolve, reject) => {
    let buffer = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`broker did not start in 20 s; stderr: ${stderr.slice(-2000)}`));
    }, 20_000);
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.stdout.on('data', (chunk: Buffer) => {
      buffer += chunk.toString();
      let newline;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        let entry: Record<string, unknown>;
        try {
          entry = JSON.parse(line) as Record<string, unknown>;
        } catch {
          continue;
        }
        logs.push(entry);
        if (entry.msg === 'broker serving' && typeof entry.port === 'number') {
          clearTimeout(timer);
          const port = entry.port;
          resolve({
            port,
            address: `127.0.0.1:${port}`,
            pid: child.pid!,
            logs,
            stop: () => {
              child.kill('SIGTERM');
              return exited;
            },
            kill: async () => {
              child.kill('SIGKILL');
              await exited;
            },
          });
        }
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(
        new Error(`broker exited with ${code} before serving; stderr: ${stderr.slice(-2000)}`),
      );
    });
  });
}
