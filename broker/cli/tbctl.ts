/**
 * tbctl: the operator's command line over the broker's gRPC API. Never prints a token value
 * unless asked with --reveal, and never takes one on the command line (it would show in `ps`).
 */
import { existsSync, readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import {
  SessionStatus,
  TokenBrokerServiceClient,
  type EnrollResponse,
  type GetTokenResponse,
  type ListSessionsResponse,
  type RevokeResponse,
  type Session,
  type WatchResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';
import { clientTransport } from '../../shared/grpc-client-credentials.js';
import { statusName } from '../../shared/session-status.js';

const USAGE = `tbctl: operate a token-broker over gRPC

Usage: tbctl [--broker ADDRESS] [--json] COMMAND [ARGS]

Commands:
  enroll TENANT USER (--refresh-token-file FILE | --refresh-token-stdin) [--idp NAME]
                        hand the broker a dedicated refresh token (do not use it again)
  list [--tenant T] [--page-size N]
                        list sessions (metadata only)
  show TENANT USER      one session's metadata
  token TENANT USER --reveal
                        print the current access token (only with --reveal)
  revoke TENANT USER    stop refreshing, revoke the refresh token at the IdP, say if it did
  watch TENANT USER [TENANT USER ...] [--count N]
                        print each new generation (never token values) until Ctrl-C or N events

Options:
  --broker ADDRESS      broker gRPC address (default $TB_BROKER_ADDRESS or 127.0.0.1:50051)
  --ca-file FILE        CA bundle the broker's certificate must chain to
                        (default $TB_BROKER_CA_FILE, else the system's roots)
  --server-name NAME    name the broker's certificate must carry (default $TB_BROKER_SERVER_NAME)
  --token-file FILE     bearer token sent with each call, e.g. a ServiceAccount token with
                        audience token-broker (default $TB_BROKER_TOKEN_FILE, else
                        /var/run/secrets/tokens/token-broker when it exists)
  --plaintext           no TLS (only for a broker run with TB_TLS=off)
  --json                machine-readable output
  --timeout MS          deadline of each call (default 10000)
  -h, --help            this text

Exit codes: 0 ok, 1 unexpected error, 2 usage error, 3 session not found,
            4 session not usable (re-authentication required, revoked), 5 broker unavailable`;

const EXIT = { ok: 0, error: 1, usage: 2, notFound: 3, precondition: 4, unavailable: 5 };

class UsageError extends Error {}

const DEFAULT_TOKEN_FILE = '/var/run/secrets/tokens/token-broker';

/** The broker client, over TLS (unless --plaintext) with the caller's token when there is one. */
function brokerClient(
  address: string,
  values: {
    'ca-file'?: string;
    'server-name'?: string;
    'token-file'?: string;
    plaintext?: boolean;
  },
  env: NodeJS.ProcessEnv,
): TokenBrokerServiceClient {
  const caFile = values['ca-file'] ?? (env.TB_BROKER_CA_FILE || undefined);
  const serverName = values['server-name'] ?? (env.TB_BROKER_SERVER_NAME || undefined);
  if (values.plaintext && (caFile || serverName))
    throw new UsageError('--plaintext cannot be combined with --ca-file or --server-name');
  const tokenFile =
    values['token-file'] ??
    (env.TB_BROKER_TOKEN_FILE || (existsSync(DEFAULT_TOKEN_FILE) ? DEFAULT_TOKEN_FILE : undefined));
  const transport = clientTransport({
    tls: values.plaintext ? 'off' : { caFile, serverName },
    tokenFile,
    settingNames: { caFile: '--ca-file', tokenFile: '--token-file' },
  });
  return new TokenBrokerServiceClient(address, transport.credentials, {
    ...transport.options,
    interceptors: transport.interceptors,
  });
}

function statusText(status: SessionStatus): string {
  return (
    statusName(status) ?? SessionStatus[status]?.replace('SESSION_STATUS_', '') ?? String(status)
  );
}

function iso(date: Date | undefined): string {
  return date ? date.toISOString() : '-';
}

function describeSession(s: Session): Record<string, unknown> {
  return {
    tenant: s.tenant,
    user: s.user,
    idp: s.idp,
    generation: s.generation,
    status: statusText(s.status),
    accessTokenExpiresAt: iso(s.accessTokenExpiresAt),
    refreshTokenExpiresAt: iso(s.refreshTokenExpiresAt),
    issuedAt: iso(s.issuedAt),
    nextRefreshAt: iso(s.nextRefreshAt),
    lastUsedAt: iso(s.lastUsedAt),
    lastErrorCode: s.lastErrorCode || '-',
    failedAttempts: s.failedAttempts,
    enrolledBy: s.enrolledBy || '-',
  };
}

type Callback<Res> = (err: grpc.ServiceError | null, res: Res) => void;

/** One unary call with a deadline. */
function unary<Res>(
  call: (metadata: grpc.Metadata, options: Partial<grpc.CallOptions>, cb: Callback<Res>) => unknown,
  timeoutMs: number,
): Promise<Res> {
  return new Promise((resolve, reject) => {
    call(new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) =>
      err ? reject(err) : resolve(res),
    );
  });
}

export async function main(
  argv: string[],
  out: NodeJS.WritableStream = process.stdout,
  err: NodeJS.WritableStream = process.stderr,
) {
  const print = (line: string) => out.write(`${line}\n`);
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        broker: { type: 'string' },
        json: { type: 'boolean', default: false },
        timeout: { type: 'string', default: '10000' },
        help: { type: 'boolean', short: 'h', default: false },
        'refresh-token-file': { type: 'string' },
        'refresh-token-stdin': { type: 'boolean', default: false },
        idp: { type: 'string', default: '' },
        tenant: { type: 'string', default: '' },
        'page-size': { type: 'string', default: '100' },
        reveal: { type: 'boolean', default: false },
        count: { type: 'string' },
        'ca-file': { type: 'string' },
        'server-name': { type: 'string' },
        'token-file': { type: 'string' },
        plaintext: { type: 'boolean', default: false },
      },
    });
  } catch (e) {
    err.write(`tbctl: ${(e as Error).message}\n\n${USAGE}\n`);
    return EXIT.usage;
  }
  const { values, positionals } = parsed;
  const [command, ...args] = positionals;
  if (values.help || !command) {
    (values.help ? out : err).write(`${USAGE}\n`);
    return values.help ? EXIT.ok : EXIT.usage;
  }
  const address = values.broker ?? process.env.TB_BROKER_ADDRESS ?? '127.0.0.1:50051';
  const timeoutMs = Number(values.timeout);
  let client: TokenBrokerServiceClient;
  try {
    client = brokerClient(address, values, process.env);
  } catch (e) {
    err.write(`tbctl: ${(e as Error).message}\n`);
    return EXIT.usage;
  }
  const pair = (what: string): [string, string] => {
    const [tenant, user] = args;
    if (!tenant || !user) throw new UsageError(`${command} needs TENANT and USER (${what})`);
    return [tenant, user];
  };
  try {
    if (!Number.isInteger(timeoutMs) || timeoutMs <= 0)
      throw new UsageError(
        `--timeout must be a positive whole number of ms, got ${values.timeout}`,
      );
    switch (command) {
      case 'enroll': {
        const [tenant, user] = pair('the session to enroll');
        let refreshToken: string;
        if (values['refresh-token-file'])
          refreshToken = readFileSync(values['refresh-token-file'], 'utf8').trim();
        else if (values['refresh-token-stdin']) refreshToken = readFileSync(0, 'utf8').trim();
        else
          throw new UsageError('enroll needs --refresh-token-file FILE or --refresh-token-stdin');
        if (!refreshToken) throw new UsageError('the refresh token given is empty');
        const res = await unary<EnrollResponse>(
          (md, o, cb) =>
            client.enroll(
              {
                tenant,
                user,
                idp: values.idp,
                credential: { $case: 'refreshToken', value: refreshToken },
              },
              md,
              o,
              cb,
            ),
          timeoutMs,
        );
        const session = describeSession(res.session!);
        print(
          values.json
            ? JSON.stringify(session)
            : `enrolled ${tenant}/${user}: generation ${String(session.generation)}, ${String(session.status)}`,
        );
        return EXIT.ok;
      }
      case 'list': {
        const pageSize = Number(values['page-size']);
        if (!Number.isInteger(pageSize) || pageSize < 1 || pageSize > 1000)
          throw new UsageError(`--page-size must be 1..1000, got ${values['page-size']}`);
        const sessions: Record<string, unknown>[] = [];
        let pageToken = '';
        do {
          const page = await unary<ListSessionsResponse>(
            (md, o, cb) =>
              client.listSessions({ tenant: values.tenant, pageSize, pageToken }, md, o, cb),
            timeoutMs,
          );
          sessions.push(...page.sessions.map(describeSession));
          pageToken = page.nextPageToken;
        } while (pageToken);
        if (values.json) print(JSON.stringify(sessions));
        else {
          print('TENANT\tUSER\tSTATUS\tGENERATION\tAT EXPIRES\tNEXT REFRESH\tLAST ERROR');
          for (const s of sessions)
            print(
              [
                s.tenant,
                s.user,
                s.status,
                s.generation,
                s.accessTokenExpiresAt,
                s.nextRefreshAt,
                s.lastErrorCode,
              ].join('\t'),
            );
        }
        return EXIT.ok;
      }
      case 'show': {
        const [tenant, user] = pair('the session to show');
        let pageToken = '';
        do {
          const page = await unary<ListSessionsResponse>(
            (md, o, cb) => client.listSessions({ tenant, pageSize: 1000, pageToken }, md, o, cb),
            timeoutMs,
          );
          const found = page.sessions.find((s) => s.user === user);
          if (found) {
            const session = describeSession(found);
            if (values.json) print(JSON.stringify(session));
            else for (const [k, v] of Object.entries(session)) print(`${k}: ${String(v)}`);
            return EXIT.ok;
          }
          pageToken = page.nextPageToken;
        } while (pageToken);
        err.write(`tbctl: no session for ${tenant}/${user}\n`);
        return EXIT.notFound;
      }
      case 'token': {
        const [tenant, user] = pair('the session whose token to print');
        if (!values.reveal)
          throw new UsageError('token prints a live access token: add --reveal to confirm');
        const res = await unary<GetTokenResponse>(
          (md, o, cb) => client.getToken({ tenant, user }, md, o, cb),
          timeoutMs,
        );
        const t = res.token!;
        print(
          values.json
            ? JSON.stringify({
                access_token: t.accessToken,
                token_type: t.tokenType,
                expires_at: iso(t.expiresAt),
                generation: t.generation,
              })
            : t.accessToken,
        );
        return EXIT.ok;
      }
      case 'revoke': {
        const [tenant, user] = pair('the session to revoke');
        const res = await unary<RevokeResponse>(
          (md, o, cb) => client.revoke({ tenant, user }, md, o, cb),
          timeoutMs,
        );
        const atIdp = res.idpRevoked
          ? 'revoked at the IdP too'
          : `NOT revoked at the IdP (${res.idpRevokeProblem || 'no reason given'}): the refresh token may still work there until it expires`;
        print(
          values.json
            ? JSON.stringify({
                ...describeSession(res.session!),
                idpRevoked: res.idpRevoked,
                idpRevokeProblem: res.idpRevokeProblem,
              })
            : `revoked ${tenant}/${user} at generation ${res.session!.generation}; ${atIdp}`,
        );
        return EXIT.ok;
      }
      case 'watch':
        return await watch(client, args, values, print, err);
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (e) {
    if (e instanceof UsageError) {
      err.write(`tbctl: ${e.message}\nRun tbctl --help for usage.\n`);
      return EXIT.usage;
    }
    const code = (e as grpc.ServiceError).code;
    const message = (e as grpc.ServiceError).details ?? (e as Error).message;
    err.write(`tbctl: ${message} (broker ${address})\n`);
    if (code === grpc.status.NOT_FOUND) return EXIT.notFound;
    if (code === grpc.status.FAILED_PRECONDITION) return EXIT.precondition;
    if (code === grpc.status.UNAVAILABLE || code === grpc.status.DEADLINE_EXCEEDED)
      return EXIT.unavailable;
    if (code === grpc.status.INVALID_ARGUMENT) return EXIT.usage;
    return EXIT.error;
  } finally {
    client.close();
  }
}

async function watch(
  client: TokenBrokerServiceClient,
  args: string[],
  values: { json?: boolean; count?: string },
  print: (line: string) => void,
  err: NodeJS.WritableStream,
): Promise<number> {
  if (args.length === 0 || args.length % 2 !== 0)
    throw new UsageError('watch needs one or more TENANT USER pairs');
  const limit = values.count === undefined ? Infinity : Number(values.count);
  if (!(limit > 0)) throw new UsageError(`--count must be a positive number, got ${values.count}`);
  const stream = client.watch();
  let seen = 0;
  return new Promise<number>((resolve) => {
    const stop = (code: number) => {
      stream.cancel();
      resolve(code);
    };
    process.once('SIGINT', () => stop(EXIT.ok));
    stream.on('data', (response: WatchResponse) => {
      const event = response.event;
      if (event?.$case === 'error') {
        const e = event.value;
        if (values.json) print(JSON.stringify({ error: e }));
        else print(`${e.tenant}/${e.user}: ${e.code}: ${e.message}`);
        return;
      }
      if (event?.$case !== 'token') return;
      const t = event.value;
      const line = {
        at: new Date().toISOString(),
        tenant: t.tenant,
        user: t.user,
        generation: t.generation,
        status: statusText(t.status),
        expiresAt: iso(t.expiresAt),
        errorCode: t.errorCode || undefined,
      };
      print(
        values.json
          ? JSON.stringify(line)
          : `${line.at} ${t.tenant}/${t.user} generation ${t.generation} ${line.status} expires ${line.expiresAt}`,
      );
      if (++seen >= limit) stop(EXIT.ok);
    });
    stream.on('error', (e: grpc.ServiceError) => {
      if (e.code === grpc.status.CANCELLED) return;
      err.write(`tbctl: watch ended: ${e.details ?? e.message}\n`);
      resolve(EXIT.unavailable);
    });
    stream.on('end', () => resolve(EXIT.unavailable));
    for (let i = 0; i < args.length; i += 2)
      stream.write({
        action: {
          $case: 'subscribe',
          value: { tenant: args[i]!, user: args[i + 1]!, afterGeneration: 0, epoch: '' },
        },
      });
  });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exit(await main(process.argv.slice(2)));
}
