/**
 * A fast OAuth2 token endpoint for benchmarks, in its own process, so its CPU is not the broker's
 * nor the load client's. It rotates refresh tokens as a strict IdP does: each is single-use, and
 * presenting a used one is a reuse that revokes the whole family (counted, so a benchmark can show
 * 0). Tokens are opaque random strings; no signing, no storage: an answer costs microseconds, so
 * the broker's own cost is what a benchmark measures. For correctness tests use oidc-provider.ts.
 *
 *   const idp = await startFastIdp({ accessTtlSeconds: 2 });
 *   const tokens = await idp.mint(1000);   // 1,000 fresh families, one refresh token each
 *   brokerEnv(idp, redis);                 // the same endpoint fields as the OIDC harness
 *   (await idp.stats()).reuses;            // 0 unless a refresh token was presented twice
 *
 * Run as `node --import tsx scripts/dev/fast-idp.ts <accessTtlSeconds>`: prints its port.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { fileURLToPath } from 'node:url';

export interface FastIdpStats {
  refreshes: number;
  reuses: number;
  revokedFamilies: number;
  mints: number;
  introspections: number;
  /** Refresh requests refused for another reason (unknown token, bad client): expect 0. */
  refused: number;
}

export interface FastIdp {
  readonly pid: number;
  readonly tokenEndpoint: string;
  readonly revocationEndpoint: string;
  readonly introspectionEndpoint: string;
  readonly clients: { readonly basic: { clientId: string; clientSecret: string } };
  /** `count` new families; resolves with their first refresh tokens. */
  mint(count: number): Promise<string[]>;
  stats(): Promise<FastIdpStats>;
  stop(): Promise<void>;
}

const CLIENT_ID = 'bench-client';
const CLIENT_SECRET = 'bench-secret';
const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export async function startFastIdp(options: { accessTtlSeconds?: number } = {}): Promise<FastIdp> {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'scripts/dev/fast-idp.ts', String(options.accessTtlSeconds ?? 60)],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  process.on('exit', () => child.kill('SIGKILL'));
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout.once('data', (chunk: Buffer) => resolve(Number(chunk.toString().trim())));
    child.once('exit', (code) => reject(new Error(`fast IdP exited with ${code} before serving`)));
  });
  const base = `http://127.0.0.1:${port}`;
  const admin = async <T>(path: string): Promise<T> => {
    const res = await fetch(`${base}${path}`, { method: 'POST' });
    if (!res.ok) throw new Error(`fast IdP ${path}: HTTP ${res.status}`);
    return (await res.json()) as T;
  };
  return {
    pid: child.pid!,
    tokenEndpoint: `${base}/token`,
    revocationEndpoint: `${base}/revoke`,
    introspectionEndpoint: `${base}/introspect`,
    clients: { basic: { clientId: CLIENT_ID, clientSecret: CLIENT_SECRET } },
    mint: async (count) => {
      const tokens: string[] = [];
      // In batches, so one answer stays small.
      for (let done = 0; done < count; done += 10_000)
        tokens.push(
          ...(await admin<string[]>(`/admin/mint?count=${Math.min(10_000, count - done)}`)),
        );
      return tokens;
    },
    stats: () => admin<FastIdpStats>('/admin/stats'),
    stop: async () => {
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** The server itself (this file run as a program). */
function serve(accessTtlSeconds: number): void {
  interface Family {
    revoked: boolean;
  }
  /** Every refresh token issued: its family and whether it was presented already. */
  const tokens = new Map<string, { family: Family; used: boolean }>();
  const stats: FastIdpStats = {
    refreshes: 0,
    reuses: 0,
    revokedFamilies: 0,
    mints: 0,
    introspections: 0,
    refused: 0,
  };
  const basic = `Basic ${Buffer.from(`${CLIENT_ID}:${CLIENT_SECRET}`).toString('base64')}`;
  const issue = (family: Family): string => {
    const token = `rt.${randomBytes(18).toString('base64url')}`;
    tokens.set(token, { family, used: false });
    return token;
  };
  const json = (res: ServerResponse, status: number, body: unknown) => {
    const text = JSON.stringify(body);
    res.writeHead(status, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(text),
      'cache-control': 'no-store',
    });
    res.end(text);
  };
  const refresh = (form: URLSearchParams, res: ServerResponse) => {
    const held = tokens.get(form.get('refresh_token') ?? '');
    if (form.get('grant_type') !== 'refresh_token' || held === undefined) {
      stats.refused++;
      return json(res, 400, { error: 'invalid_grant' });
    }
    if (held.family.revoked) return json(res, 400, { error: 'invalid_grant' });
    if (held.used) {
      // A reuse: the whole family is revoked, as oidc-provider and Keycloak do.
      stats.reuses++;
      stats.revokedFamilies++;
      held.family.revoked = true;
      return json(res, 400, { error: 'invalid_grant' });
    }
    held.used = true;
    stats.refreshes++;
    json(res, 200, {
      access_token: `at.${randomBytes(24).toString('base64url')}`,
      token_type: 'Bearer',
      expires_in: accessTtlSeconds,
      refresh_token: issue(held.family),
      scope: 'openid offline_access',
    });
  };
  const handle = (req: IncomingMessage, res: ServerResponse, body: string) => {
    const url = new URL(req.url ?? '/', 'http://idp');
    if (url.pathname === '/admin/mint') {
      const count = Number(url.searchParams.get('count') ?? 1);
      stats.mints += count;
      return json(
        res,
        200,
        Array.from({ length: count }, () => issue({ revoked: false })),
      );
    }
    if (url.pathname === '/admin/stats') return json(res, 200, stats);
    if (req.headers.authorization !== basic) {
      stats.refused++;
      return json(res, 401, { error: 'invalid_client' });
    }
    const form = new URLSearchParams(body);
    if (url.pathname === '/token') return refresh(form, res);
    if (url.pathname === '/introspect') {
      stats.introspections++;
      const held = tokens.get(form.get('token') ?? '');
      return json(res, 200, { active: held !== undefined && !held.used && !held.family.revoked });
    }
    if (url.pathname === '/revoke') {
      const held = tokens.get(form.get('token') ?? '');
      if (held) held.family.revoked = true;
      res.writeHead(200, { 'content-length': 0 });
      return res.end();
    }
    json(res, 404, { error: 'not_found' });
  };
  const server = createServer({ keepAliveTimeout: 60_000 }, (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => handle(req, res, Buffer.concat(chunks).toString('utf8')));
  });
  server.listen(0, '127.0.0.1', () => {
    const address = server.address();
    process.stdout.write(`${typeof address === 'object' && address ? address.port : 0}\n`);
  });
  process.on('SIGTERM', () => server.close(() => process.exit(0)));
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1])
  serve(Number(process.argv[2] ?? 60));
