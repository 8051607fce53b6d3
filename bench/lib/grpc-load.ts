/**
 * A gRPC load client in its own process, so its CPU is neither the measured server's nor the
 * bench's: `channels` separate HTTP/2 connections (TLS, the dev cluster's ServiceAccount token on
 * every call, as a sidecar sends it) with `concurrency` calls in flight spread over them. The same
 * client loads the broker and the bare baseline server, so both answer the same requests.
 *
 *   const load = await startGrpcLoad();
 *   const r = await load.run({ kind: 'getToken', address, tls, channels: 4, concurrency: 64, ms });
 *   await load.stop();
 *
 * Only ever connects to the address it is given (127.0.0.1 in every bench). Never prints tokens.
 */
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { serveWorker, startWorkerProcess, type WorkerProcess } from './worker-process.js';

export interface LoadTarget {
  address: string;
  /** The CA the server's certificate chains to, and the name it carries. */
  caFile: string;
  serverName: string;
  /** A projected ServiceAccount token file, sent as the bearer token. */
  tokenFile: string;
  channels: number;
  concurrency: number;
}

export type LoadSpec = LoadTarget &
  (
    | { kind: 'getToken'; ms: number; tenant: string; user: string }
    /** One Enroll per refresh token (of user `${userPrefix}${i}`), until `ms` or they run out. */
    | { kind: 'enroll'; ms: number; tenant: string; userPrefix: string; refreshTokens: string[] }
  );

export interface LoadResult {
  calls: number;
  failed: number;
  /** The first failure's gRPC code and details (never a token). */
  firstError: string;
  seconds: number;
  p50Ms: number;
  p99Ms: number;
}

export type GrpcLoad = WorkerProcess<LoadSpec, LoadResult>;

const SELF = fileURLToPath(import.meta.url);

export function startGrpcLoad(): Promise<GrpcLoad> {
  return startWorkerProcess<LoadSpec, LoadResult>(SELF, '--load-child', 'load client');
}

/** The child: runs each spec it is sent and answers with its result. */
async function childMain(): Promise<void> {
  const { clientTransport } = await import('../../shared/grpc-client-credentials.js');
  const { TokenBrokerServiceClient } = await import('../../gen/tokenbroker/v1/token_broker.js');
  type Client = InstanceType<typeof TokenBrokerServiceClient>;
  const clients = new Map<string, Client[]>();
  const clientsFor = (t: LoadTarget): Client[] => {
    const key = `${t.address} ${t.channels}`;
    let list = clients.get(key);
    if (!list) {
      const transport = clientTransport({
        tls: { caFile: t.caFile, serverName: t.serverName },
        tokenFile: t.tokenFile,
      });
      list = Array.from(
        { length: t.channels },
        () =>
          new TokenBrokerServiceClient(t.address, transport.credentials, {
            ...transport.options,
            // One HTTP/2 connection per client, not one shared by all.
            'grpc.use_local_subchannel_pool': 1,
            interceptors: transport.interceptors,
          }),
      );
      clients.set(key, list);
    }
    return list;
  };
  const unary = <Res>(
    fn: (callback: (err: grpc.ServiceError | null, res: Res) => void) => unknown,
  ): Promise<Res> =>
    new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))));

  const run = async (spec: LoadSpec): Promise<LoadResult> => {
    const list = clientsFor(spec);
    const latencies: number[] = [];
    let failed = 0;
    let firstError = '';
    let next = 0;
    const started = performance.now();
    const until = started + spec.ms;
    const one = (client: Client): Promise<unknown> | undefined => {
      if (spec.kind === 'getToken')
        return unary((cb) => client.getToken({ tenant: spec.tenant, user: spec.user }, cb));
      const i = next++;
      if (i >= spec.refreshTokens.length) return undefined;
      return unary((cb) =>
        client.enroll(
          {
            tenant: spec.tenant,
            user: `${spec.userPrefix}${i}`,
            idp: '',
            credential: { $case: 'refreshToken', value: spec.refreshTokens[i]! },
          },
          cb,
        ),
      );
    };
    await Promise.all(
      Array.from({ length: spec.concurrency }, async (_, lane) => {
        const client = list[lane % list.length]!;
        while (performance.now() < until) {
          const at = performance.now();
          const call = one(client);
          if (!call) return;
          try {
            await call;
            latencies.push(performance.now() - at);
          } catch (err) {
            failed++;
            const e = err as grpc.ServiceError;
            firstError ||= `${grpc.status[e.code] ?? e.code}: ${e.details}`;
          }
        }
      }),
    );
    const seconds = (performance.now() - started) / 1_000;
    latencies.sort((a, b) => a - b);
    const at = (p: number) =>
      latencies.length
        ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))]!
        : NaN;
    return {
      calls: latencies.length,
      failed,
      firstError,
      seconds,
      p50Ms: at(0.5),
      p99Ms: at(0.99),
    };
  };

  serveWorker(run, () => {
    for (const list of clients.values()) for (const c of list) c.close();
  });
}

if (process.argv.includes('--load-child')) await childMain();
