import { spawnNodeProcess, waitForLog, type LogEntry, type SpawnOptions } from './node-process.js';

export interface BrokerProcess {
  readonly port: number;
  readonly address: string;
  readonly pid: number;
  /** Every log line the broker printed (JSON objects). */
  readonly logs: LogEntry[];
  /** SIGTERM and wait for the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL: a crash. */
  kill(): Promise<void>;
}

/**
 * Starts `broker/main.ts` as a separate Node.js process (real replica) with `env` on top of a
 * minimal environment (so telemetry is off unless `env` asks); resolves once it logs its bound port.
 */
export async function startBrokerProcess(
  env: Record<string, string>,
  options: SpawnOptions = {},
): Promise<BrokerProcess> {
  const proc = spawnNodeProcess(
    'broker/main.ts',
    {
      TB_GRPC_ADDRESS: '127.0.0.1:0',
      ...env,
      // Info level at least: the harness learns the bound port from the 'broker serving' line.
      TB_LOG_LEVEL: 'info',
    },
    options,
  );
  const serving = await waitForLog(
    proc,
    'broker',
    (entry) => entry.msg === 'broker serving' && typeof entry.port === 'number',
  );
  const port = serving.port as number;
  return {
    port,
    address: `127.0.0.1:${port}`,
    pid: proc.child.pid!,
    logs: proc.logs,
    stop: proc.stop,
    kill: proc.kill,
  };
}
