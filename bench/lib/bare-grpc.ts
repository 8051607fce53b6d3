/**
 * The GetToken baseline: a bare grpc-js server in its own process, on the broker's own service
 * definition and TLS certificate, answering every GetToken with one canned response (no auth, no
 * state, no policy). What it costs is grpc-js + TLS + protobuf for a message of the broker's size,
 * so a broker / bare ratio measures the broker's own work per call.
 *
 *   const bare = await startBareGrpc({ certFile, keyFile, response });  // { address, pid, stop }
 *
 * Run as a program it reads its settings from BARE_GRPC (JSON) and prints its port.
 */
import { fork } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import {
  TokenBrokerServiceService,
  type GetTokenResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';

export interface BareGrpcSettings {
  certFile: string;
  keyFile: string;
  /** Answered to every GetToken, as JSON (dates as ISO strings). */
  response: GetTokenResponse;
}

export interface BareGrpc {
  readonly pid: number;
  readonly address: string;
  stop(): Promise<void>;
}

const SELF = fileURLToPath(import.meta.url);

export async function startBareGrpc(settings: BareGrpcSettings): Promise<BareGrpc> {
  const child = fork(SELF, ['--bare-grpc'], {
    execArgv: ['--import', 'tsx'],
    env: { PATH: process.env.PATH ?? '', BARE_GRPC: JSON.stringify(settings) },
    stdio: ['ignore', 'pipe', 'inherit', 'ipc'],
  });
  process.on('exit', () => child.kill('SIGKILL'));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout!.once('data', (chunk: Buffer) => resolve(Number(chunk.toString().trim())));
    child.once('exit', (code) => reject(new Error(`bare gRPC server exited with ${code}`)));
  });
  return {
    pid: child.pid!,
    address: `127.0.0.1:${port}`,
    stop: async () => {
      child.kill('SIGTERM');
      await exited;
    },
  };
}

function serve(settings: BareGrpcSettings): void {
  const token = settings.response.token;
  const response: GetTokenResponse = {
    token: token && {
      ...token,
      expiresAt: token.expiresAt && new Date(token.expiresAt),
      issuedAt: token.issuedAt && new Date(token.issuedAt),
    },
  };
  const server = new grpc.Server();
  // Only GetToken is implemented; grpc-js answers the others UNIMPLEMENTED.
  server.addService(TokenBrokerServiceService, {
    getToken: (_call: unknown, callback: grpc.sendUnaryData<GetTokenResponse>) =>
      callback(null, response),
  });
  const credentials = grpc.ServerCredentials.createSsl(null, [
    {
      cert_chain: readFileSync(settings.certFile),
      private_key: readFileSync(settings.keyFile),
    },
  ]);
  server.bindAsync('127.0.0.1:0', credentials, (err, port) => {
    if (err) throw err;
    process.stdout.write(`${port}\n`);
  });
  process.on('SIGTERM', () => server.tryShutdown(() => process.exit(0)));
}

if (process.argv.includes('--bare-grpc'))
  serve(JSON.parse(process.env.BARE_GRPC ?? '{}') as BareGrpcSettings);
