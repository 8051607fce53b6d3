/**
 * The sidecar as a real child process (`npm run sidecar`: tsx and the telemetry entry), for tests.
 *
 *   const sidecar = await startSidecarProcess({ TB_SIDECAR_BROKER_ADDRESS: broker.address });
 *   const res = await sidecar.token('diku', 'alice', { wait: 2000 });   // fetch Response
 *   sidecar.output();        // everything it printed, to check that no token value leaked
 *   await sidecar.stop();    // SIGTERM, resolves with the exit code
 *
 * TB_SIDECAR_PORT defaults to 0 here; the harness learns the port from the 'sidecar serving' log
 * line. Children still alive when the test process exits are killed with SIGKILL.
 */
import { request } from 'node:http';
import { devIdentity } from './dev-identity.js';
import { spawnNodeProcess, waitForLog, type SpawnOptions } from './node-process.js';

export const TOKEN_HEADER = { 'x-token-broker': 'true' } as const;

export interface TokenQuery {
  wait?: number;
  minGeneration?: number;
  accept?: string;
}

export interface SidecarProcess {
  /** Undefined when serving on a Unix socket. */
  readonly port: number | undefined;
  readonly url: string;
  readonly pid: number;
  /** Parsed JSON log lines. */
  readonly logs: Record<string, unknown>[];
  /** Raw stdout and stderr so far. */
  output(): string;
  /** GET /v1/tokens/{tenant}/{user} with the required header. */
  token(tenant: string, user: string, query?: TokenQuery): Promise<Response>;
  /** GET any path (no header unless given). */
  get(path: string, headers?: Record<string, string>): Promise<Response>;
  /** SIGTERM; resolves with the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL. */
  kill(): Promise<void>;
  readonly exited: Promise<number | null>;
}

/** Spawns a sidecar; resolves once it serves. Rejects if it exits first (see `runSidecarToExit`). */
export async function startSidecarProcess(
  env: Record<string, string>,
  options: SpawnOptions = {},
): Promise<SidecarProcess> {
  const proc = spawnSidecar(env, options);
  const serving = await waitForLog(proc, 'sidecar', (entry) => entry.msg === 'sidecar serving');
  const port = typeof serving.port === 'number' ? serving.port : undefined;
  const url = port === undefined ? 'http://localhost' : `http://127.0.0.1:${port}`;
  const get = (path: string, headers: Record<string, string> = {}) =>
    port === undefined
      ? socketGet(String(serving.socket), path, headers)
      : fetch(`${url}${path}`, { headers });
  return {
    port,
    url,
    pid: proc.child.pid!,
    logs: proc.logs,
    output: proc.output,
    exited: proc.exited,
    get,
    token: (tenant, user, query = {}) => {
      const params = new URLSearchParams();
      if (query.wait !== undefined) params.set('wait', String(query.wait));
      if (query.minGeneration !== undefined)
        params.set('min_generation', String(query.minGeneration));
      const qs = params.size > 0 ? `?${params.toString()}` : '';
      const headers: Record<string, string> = { ...TOKEN_HEADER };
      if (query.accept) headers.accept = query.accept;
      return get(
        `/v1/tokens/${encodeURIComponent(tenant)}/${encodeURIComponent(user)}${qs}`,
        headers,
      );
    },
    stop: proc.stop,
    kill: proc.kill,
  };
}

/** Runs a sidecar that is expected to stop by itself (a configuration error). */
export async function runSidecarToExit(
  env: Record<string, string>,
): Promise<{ code: number | null; logs: Record<string, unknown>[] }> {
  const { child, exited, logs } = spawnSidecar(env);
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  const code = await exited;
  clearTimeout(timer);
  return { code, logs };
}

/** Sidecars run as a dev-cluster workload: TLS to the broker and a ServiceAccount token. */
function spawnSidecar(env: Record<string, string>, options: SpawnOptions = {}) {
  return spawnNodeProcess(
    'sidecar/main.ts',
    {
      TB_SIDECAR_PORT: '0',
      TB_SIDECAR_LOG_LEVEL: 'info',
      ...devIdentity().sidecarEnv(),
      ...env,
    },
    options,
  );
}

/** A GET over a Unix socket, answered as a fetch Response. */
function socketGet(socketPath: string, path: string, headers: Record<string, string>) {
  return new Promise<Response>((resolve, reject) => {
    const req = request({ socketPath, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const h = new Headers();
        for (const [k, v] of Object.entries(res.headers)) if (typeof v === 'string') h.set(k, v);
        resolve(new Response(Buffer.concat(chunks), { status: res.statusCode ?? 0, headers: h }));
      });
    });
    req.on('error', reject);
    req.end();
  });
}

/** The JSON error body of a sidecar answer. */
export async function errorOf(res: Response): Promise<{ code: string; message: string }> {
  const body = (await res.json()) as { error?: { code?: unknown; message?: unknown } };
  if (typeof body.error?.code !== 'string' || typeof body.error.message !== 'string')
    throw new Error(`not a sidecar error body (HTTP ${res.status})`);
  return { code: body.error.code, message: body.error.message };
}

export interface TokenBody {
  access_token: string;
  token_type: string;
  expires_at: string;
  expires_in: number;
  generation: number;
}

/** Reads a metric's value from Prometheus text (the first sample matching name and labels). */
export function metricValue(text: string, sample: string): number | undefined {
  for (const line of text.split('\n'))
    if (line.startsWith(`${sample} `)) return Number(line.slice(sample.length + 1));
  return undefined;
}
