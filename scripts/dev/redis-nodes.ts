/**
 * Real redis-server processes for integration tests, one per Redlock node.
 *
 *   const redis = await startRedisNodes(3);
 *   redis.urls;                  // ['redis://127.0.0.1:P1', ...]
 *   await redis.nodes[0]!.kill(); // SIGKILL: clients now get ECONNREFUSED
 *   await redis.nodes[0]!.restart(); // same port, empty data set
 *   await redis.stopAll();
 *
 * Each node is a child process (not daemonized) with no persistence, bound to 127.0.0.1 on a free
 * port, in its own temporary directory. The binary is TB_REDIS_SERVER_BIN or `redis-server`.
 * Children still alive when the test process exits are killed with SIGKILL.
 *
 * The same binary also gives the replicated shapes (see redis-topologies.ts):
 * startRedisSentinel (a master, replicas and sentinels) and startRedisCluster (masters with a
 * replica each). `startRedisNodes(n, extraArgs)` passes extra server arguments to every node.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { freePort } from './free-port.js';

export interface RedisNode {
  readonly port: number;
  /** `redis://127.0.0.1:PORT` */
  readonly url: string;
  /** Pid of the current process, or of the last one once it has exited. */
  readonly pid: number;
  readonly running: boolean;
  /** SIGTERM, then waits for the exit (SIGKILL after 5 s). No-op when not running. */
  stop(): Promise<void>;
  /** SIGKILL, then waits for the exit: a crash. No-op when not running. */
  kill(): Promise<void>;
  /** Starts a fresh, empty server on the same port (stopping the current one first). */
  restart(): Promise<void>;
}

export interface RedisNodes {
  readonly nodes: readonly RedisNode[];
  readonly urls: readonly string[];
  /** Stops every node and removes their directories. Safe to call twice. */
  stopAll(): Promise<void>;
}

const READY_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 5_000;
const PORT_ATTEMPTS = 5;
const OUTPUT_TAIL_CHARS = 4_000;

const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;

function redisServerBin(): string {
  return process.env['TB_REDIS_SERVER_BIN'] || 'redis-server';
}

/**
 * Arguments for one node, given its port and directory (written files may go there). Default:
 * a plain server; see redis-topologies.ts for replicas, sentinels and cluster nodes.
 */
export type NodeArgs = (port: number, dir: string) => Promise<string[]> | string[];

export async function startRedisNodes(
  count: number,
  args: NodeArgs = () => [],
): Promise<RedisNodes> {
  if (!Number.isInteger(count) || count < 1) {
    throw new Error(`startRedisNodes: count must be a positive integer, got ${count}`);
  }
  installExitHook();
  const results = await Promise.allSettled(
    Array.from({ length: count }, () => RedisServerNode.startOnFreePort(args)),
  );
  const nodes = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  const failure = results.find((r) => r.status === 'rejected');
  if (failure) {
    await Promise.all(nodes.map((n) => n.dispose()));
    throw failure.reason;
  }
  return {
    nodes,
    urls: nodes.map((n) => n.url),
    stopAll: async () => {
      await Promise.all(nodes.map((n) => n.dispose()));
    },
  };
}

class RedisServerNode implements RedisNode {
  readonly url: string;
  #child: ChildProcess;
  #exited: Promise<void>;

  private constructor(
    readonly port: number,
    private readonly dir: string,
    private readonly args: NodeArgs,
    started: StartedServer,
  ) {
    this.url = `redis://127.0.0.1:${port}`;
    this.#child = started.child;
    this.#exited = started.exited;
  }

  static async startOnFreePort(args: NodeArgs): Promise<RedisServerNode> {
    const dir = await mkdtemp(join(tmpdir(), 'tb-redis-'));
    try {
      for (let attempt = 1; ; attempt++) {
        const port = await freePort();
        try {
          const extra = await args(port, dir);
          return new RedisServerNode(port, dir, args, await startServer(port, dir, extra));
        } catch (err) {
          // Another process took the port between freePort() and the bind: pick another.
          if (!(err instanceof PortInUseError) || attempt >= PORT_ATTEMPTS) throw err;
        }
      }
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  get pid(): number {
    return this.#child.pid ?? -1;
  }

  get running(): boolean {
    return isRunning(this.#child);
  }

  async stop(): Promise<void> {
    if (!this.running) return;
    this.#child.kill('SIGTERM');
    const stopped = await Promise.race([
      this.#exited.then(() => true),
      sleep(STOP_TIMEOUT_MS).then(() => false),
    ]);
    if (!stopped) await this.kill();
  }

  async kill(): Promise<void> {
    if (!this.running) return;
    this.#child.kill('SIGKILL');
    await this.#exited;
  }

  async restart(): Promise<void> {
    await this.stop();
    // The old listener is gone, but give the kernel a moment if the port is still held.
    for (let attempt = 1; ; attempt++) {
      try {
        const started = await startServer(
          this.port,
          this.dir,
          await this.args(this.port, this.dir),
        );
        this.#child = started.child;
        this.#exited = started.exited;
        return;
      } catch (err) {
        if (!(err instanceof PortInUseError) || attempt >= PORT_ATTEMPTS) throw err;
        await sleep(200 * attempt);
      }
    }
  }

  async dispose(): Promise<void> {
    await this.stop();
    await rm(this.dir, { recursive: true, force: true });
  }
}

class PortInUseError extends Error {}

interface StartedServer {
  child: ChildProcess;
  exited: Promise<void>;
}

/** Spawns redis-server on `port` and resolves once it answers PING. */
async function startServer(port: number, dir: string, extra: string[]): Promise<StartedServer> {
  const bin = redisServerBin();
  // A config file (sentinels need one) must come first; the rest are options after it.
  const [first, ...rest] = extra;
  const configFile = first?.endsWith('.conf') ? [first] : [];
  const options = configFile.length > 0 ? rest : extra;
  // prettier-ignore
  const args = [
    ...configFile,
    '--port', String(port), '--bind', '127.0.0.1', '--dir', dir,
    '--save', '', '--appendonly', 'no', '--daemonize', 'no', '--loglevel', 'warning',
    ...options,
  ];
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const keepTail = (chunk: Buffer): void => {
    output = (output + chunk.toString('utf8')).slice(-OUTPUT_TAIL_CHARS);
  };
  child.stdout?.on('data', keepTail);
  child.stderr?.on('data', keepTail);

  let spawnError: NodeJS.ErrnoException | undefined;
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', (err) => {
      spawnError = err;
      resolve();
    });
  }).then(() => {
    liveChildren.delete(child);
  });
  liveChildren.add(child);

  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (!isRunning(child)) {
      await exited;
      if (spawnError?.code === 'ENOENT') {
        throw new Error(
          `redis-server binary "${bin}" not found: run \`make setup\` (scripts/ensure-redis.sh) ` +
            'to install it, or point TB_REDIS_SERVER_BIN at one',
        );
      }
      if (spawnError) throw new Error(`could not start ${bin}: ${spawnError.message}`);
      const detail = `${bin} on port ${port} exited early (code ${child.exitCode}, signal ${child.signalCode}):\n${output}`;
      throw /address already in use/i.test(output) ? new PortInUseError(detail) : new Error(detail);
    }
    if (await answersPing(port)) return { child, exited };
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      await exited;
      throw new Error(
        `${bin} on port ${port} did not answer PING within ${READY_TIMEOUT_MS} ms:\n${output}`,
      );
    }
    await sleep(25);
  }
}

function isRunning(child: ChildProcess): boolean {
  return child.pid !== undefined && child.exitCode === null && child.signalCode === null;
}

/** True when a server on `port` answers `+PONG` (not `-LOADING` or a refused connection). */
async function answersPing(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    let reply = '';
    const finish = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1_000, () => finish(false));
    socket.once('error', () => finish(false));
    socket.once('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk: Buffer) => {
      reply += chunk.toString('utf8');
      if (reply.includes('\r\n')) finish(reply.startsWith('+PONG'));
    });
  });
}

/** Kills every child still alive when the test process goes away, whatever the reason. */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  const killAll = (): void => {
    for (const child of liveChildren) child.kill('SIGKILL');
  };
  process.on('exit', killAll);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(signal, () => {
      killAll();
      // Keep the default outcome of the signal when nobody else handles it.
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
    });
  }
}
