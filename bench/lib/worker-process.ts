/**
 * A benchmark part in its own process (a load client, a baseline loop), so its CPU is not the
 * measured process's: this file's `fork` of the module that calls `serveWorker` when started with
 * `flag`. One spec in, one result out over Node's IPC channel, one run at a time.
 */
import { fork } from 'node:child_process';

export interface WorkerProcess<Spec, Result> {
  readonly pid: number;
  run(spec: Spec): Promise<Result>;
  stop(): Promise<void>;
}

/** Forks `file` with `flag` (through tsx) and resolves once it says it is ready. */
export async function startWorkerProcess<Spec, Result>(
  file: string,
  flag: string,
  name: string,
): Promise<WorkerProcess<Spec, Result>> {
  const child = fork(file, [flag], {
    execArgv: ['--import', 'tsx'],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  process.on('exit', () => child.kill('SIGKILL'));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.once('message', () => resolve());
    child.once('exit', (code) => reject(new Error(`${name} exited with ${code}`)));
  });
  return {
    pid: child.pid!,
    run: (spec) =>
      new Promise((resolve) => {
        child.once('message', (m) => resolve(m as Result));
        child.send(spec as object);
      }),
    stop: async () => {
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** The worker's side: answers each spec with `run`'s result; `onStop` runs at SIGTERM. */
export function serveWorker<Spec, Result>(
  run: (spec: Spec) => Promise<Result>,
  onStop: () => void,
): void {
  process.on('message', (spec: Spec) => {
    void run(spec).then((result) => process.send!(result));
  });
  process.on('SIGTERM', () => {
    onStop();
    process.exit(0);
  });
  process.send!('ready');
}
