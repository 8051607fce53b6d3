/**
 * The broker's IdP HTTP client: POSTs/s and client CPU per call of postOnce (node:http keep-alive
 * agent) beside global fetch doing the same POST, and a bare node:http keep-alive loop as the
 * floor, in the same run, against the fast IdP (its own process). Each client runs in a process
 * of its own so its CPU time is its alone (process.cpuUsage over the timed window only, not the
 * start-up). Prints figures; never passes or fails on them. Everything is on 127.0.0.1 and stops
 * by itself.
 *
 *   make bench BENCH=idp-client   (BENCH_ROUNDS, default 3, of BENCH_SECONDS, default 4, per
 *                                  client; BENCH_CONCURRENCY, default 32 calls in flight, as
 *                                  TB_ROTATION_CONCURRENCY)
 *
 * Each call is a real rotation: a refresh_token grant with client_secret_basic, the answer's JSON
 * parsed and its new refresh token presented next, one family per in-flight loop (the IdP counts
 * reuses: expect 0). Plain http: the fast IdP has no TLS, and all three clients use the same
 * transport, so the ratios compare the clients' own work. Rounds alternate the clients, so drift
 * hits all alike; each figure is the median round.
 */
import { spawn } from 'node:child_process';
import { Agent, request } from 'node:http';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';

import { fmt, printTable } from './lib/report.js';
import { postOnce, type SendOptions } from '../broker/idp/idp-http.js';
import { startFastIdp } from '../scripts/dev/fast-idp.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? 32);
const CLIENTS = ['postOnce', 'fetch', 'bare'] as const;
type ClientName = (typeof CLIENTS)[number];

interface Figures {
  calls: number;
  failed: number;
  seconds: number;
  cpuUs: number;
}

/** One POST of `form`; resolves with the answer's text. */
type Post = (form: string) => Promise<string>;

function clientOf(name: ClientName, endpoint: string, authorization: string): Post {
  const headers = {
    accept: 'application/json',
    'content-type': 'application/x-www-form-urlencoded',
    authorization,
  };
  if (name === 'postOnce') {
    const options = {
      where: 'bench IdP',
      timeoutMs: 10_000,
      answerWaitMs: 10_000,
      signal: new AbortController().signal,
      // Ignored by the node:http postOnce; lets this bench run on the fetch-based one (before).
      fetch: globalThis.fetch,
    } as SendOptions;
    return async (form) => (await postOnce(endpoint, headers, form, options)).text;
  }
  if (name === 'fetch') {
    return async (form) => {
      const response = await fetch(endpoint, {
        method: 'POST',
        headers,
        body: form,
        redirect: 'manual',
      });
      return response.text();
    };
  }
  const agent = new Agent({ keepAlive: true, maxSockets: CONCURRENCY });
  const url = new URL(endpoint);
  return (form) =>
    new Promise((resolve, reject) => {
      const body = Buffer.from(form);
      const req = request(
        url,
        { method: 'POST', agent, headers: { ...headers, 'content-length': body.length } },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (chunk: Buffer) => chunks.push(chunk));
          res.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.end(body);
    });
}

/** The client process: rotates CONCURRENCY families for SECONDS and prints its figures. */
async function runClient(name: ClientName, endpoint: string, authorization: string): Promise<void> {
  const mint = await fetch(new URL(`/admin/mint?count=${CONCURRENCY}`, endpoint), {
    method: 'POST',
  });
  const tokens = (await mint.json()) as string[];
  const post = clientOf(name, endpoint, authorization);
  const rotate = async (token: string): Promise<string> => {
    const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: token });
    const answer = JSON.parse(await post(form.toString())) as { refresh_token?: string };
    if (typeof answer.refresh_token !== 'string') throw new Error('no refresh token answered');
    return answer.refresh_token;
  };
  // A warm-up rotation per family (connections, JIT), not counted.
  for (let i = 0; i < tokens.length; i++) tokens[i] = await rotate(tokens[i]!);

  let calls = 0;
  let failed = 0;
  const cpu = process.cpuUsage();
  const started = performance.now();
  const until = started + SECONDS * 1_000;
  await Promise.all(
    tokens.map(async (first) => {
      let token = first;
      while (performance.now() < until) {
        try {
          token = await rotate(token);
          calls++;
        } catch {
          // A failed rotation ends this family's loop: its token state is unknown.
          failed++;
          return;
        }
      }
    }),
  );
  const seconds = (performance.now() - started) / 1_000;
  const used = process.cpuUsage(cpu);
  const figures: Figures = { calls, failed, seconds, cpuUs: used.user + used.system };
  process.stdout.write(`${JSON.stringify(figures)}\n`);
  process.exit(0);
}

function spawnClient(name: ClientName, endpoint: string, authorization: string): Promise<Figures> {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', fileURLToPath(import.meta.url), 'client', name, endpoint],
    {
      env: { ...process.env, BENCH_IDP_AUTHORIZATION: authorization },
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  );
  let out = '';
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
  return new Promise((resolve, reject) => {
    child.once('exit', (code) => {
      if (code === 0) resolve(JSON.parse(out.trim()) as Figures);
      else reject(new Error(`${name} client exited with ${code}`));
    });
  });
}

async function main(): Promise<void> {
  const idp = await startFastIdp({ accessTtlSeconds: 3_600 });
  const { clientId, clientSecret } = idp.clients.basic;
  const authorization = `Basic ${Buffer.from(`${clientId}:${clientSecret}`).toString('base64')}`;
  const results = Object.fromEntries(CLIENTS.map((c) => [c, [] as Figures[]])) as Record<
    ClientName,
    Figures[]
  >;
  try {
    for (let round = 0; round < ROUNDS; round++) {
      for (const name of CLIENTS) {
        results[name].push(await spawnClient(name, idp.tokenEndpoint, authorization));
      }
    }
    const stats = await idp.stats();
    const median = (values: number[]) =>
      [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
    const rate = (name: ClientName) => median(results[name].map((f) => f.calls / f.seconds));
    const cpu = (name: ClientName) => median(results[name].map((f) => f.cpuUs / f.calls));
    const failed = CLIENTS.map((name) => results[name].reduce((n, f) => n + f.failed, 0));
    printTable(
      `IdP client: ${CONCURRENCY} rotations in flight, median of ${ROUNDS} x ${SECONDS} s per client`,
      [
        {
          what: 'POSTs/s, postOnce vs fetch',
          value: fmt.rate(rate('postOnce')),
          baseline: `fetch ${fmt.rate(rate('fetch'))}`,
          ratio: rate('postOnce') / rate('fetch'),
        },
        {
          what: 'client CPU per call, postOnce vs fetch',
          value: `${cpu('postOnce').toFixed(1)} us`,
          baseline: `fetch ${cpu('fetch').toFixed(1)} us`,
          ratio: cpu('postOnce') / cpu('fetch'),
        },
        {
          what: 'POSTs/s, postOnce vs bare node:http',
          value: fmt.rate(rate('postOnce')),
          baseline: `bare ${fmt.rate(rate('bare'))}`,
          ratio: rate('postOnce') / rate('bare'),
        },
        {
          what: 'client CPU per call, postOnce vs bare node:http',
          value: `${cpu('postOnce').toFixed(1)} us`,
          baseline: `bare ${cpu('bare').toFixed(1)} us`,
          ratio: cpu('postOnce') / cpu('bare'),
        },
        {
          what: 'failed calls (postOnce, fetch, bare); IdP reuses',
          value: `${failed.join(', ')}; ${stats.reuses}`,
        },
      ],
    );
  } finally {
    await idp.stop();
  }
}

if (process.argv[2] === 'client') {
  await runClient(
    process.argv[3] as ClientName,
    process.argv[4]!,
    process.env.BENCH_IDP_AUTHORIZATION ?? '',
  );
} else {
  await main();
}
