import * as grpc from '@grpc/grpc-js';
import {
  clientTransport,
  type ClientTransportSettings,
} from '../../shared/grpc-client-credentials.js';
import { devIdentity } from './dev-identity.js';
import {
  TokenBrokerServiceClient,
  type EnrollResponse,
  type GetTokenResponse,
  type ListSessionsResponse,
  type RefreshResponse,
  type RevokeResponse,
  type TokenEvent,
  type WatchError,
  type WatchRequest,
  type WatchResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';

type Unary<Req, Res> = (
  req: Req,
  callback: (err: grpc.ServiceError | null, res: Res) => void,
) => grpc.ClientUnaryCall;

function call<Req, Res>(fn: Unary<Req, Res>, req: Req): Promise<Res> {
  return new Promise((resolve, reject) =>
    fn(req, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

/** TLS and a ServiceAccount token of the dev cluster (scripts/dev/dev-identity.ts). */
export function devClientTransport(serviceAccount = 'test-client'): ClientTransportSettings {
  const identity = devIdentity();
  return {
    tls: { caFile: identity.caFile, serverName: identity.serverName },
    tokenFile: identity.tokenFile(serviceAccount),
  };
}

const HEALTH_STATUS = ['UNKNOWN', 'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN'];

/** A promise-based client of one broker replica, for tests. */
export class BrokerClient {
  readonly raw: TokenBrokerServiceClient;

  /**
   * `transport` defaults to what a workload of the dev cluster uses: TLS trusting the dev CA and
   * the projected token of `token-broker-dev/test-client`. 'plaintext' is for a broker started
   * without TLS and authentication, and says so at the call site.
   */
  constructor(
    readonly address: string,
    transport: ClientTransportSettings | 'plaintext' = devClientTransport(),
  ) {
    if (transport === 'plaintext') {
      this.raw = new TokenBrokerServiceClient(address, grpc.credentials.createInsecure());
      return;
    }
    const t = clientTransport(transport);
    this.raw = new TokenBrokerServiceClient(address, t.credentials, {
      ...t.options,
      interceptors: t.interceptors,
    });
  }

  enroll(tenant: string, user: string, refreshToken: string): Promise<EnrollResponse> {
    return call(this.raw.enroll.bind(this.raw), {
      tenant,
      user,
      idp: '',
      credential: { $case: 'refreshToken', value: refreshToken },
    });
  }

  getToken(tenant: string, user: string): Promise<GetTokenResponse> {
    return call(this.raw.getToken.bind(this.raw), { tenant, user });
  }

  refresh(tenant: string, user: string, generation: number): Promise<RefreshResponse> {
    return call(this.raw.refresh.bind(this.raw), { tenant, user, generation });
  }

  revoke(tenant: string, user: string): Promise<RevokeResponse> {
    return call(this.raw.revoke.bind(this.raw), { tenant, user });
  }

  /** The standard health check of the whole server, over this client's channel. */
  health(): Promise<string> {
    const Health = grpc.makeGenericClientConstructor(
      {
        check: {
          path: '/grpc.health.v1.Health/Check',
          requestStream: false,
          responseStream: false,
          // { service: '' } encodes to no bytes; the answer's field 1 is the status enum.
          requestSerialize: () => Buffer.alloc(0),
          requestDeserialize: () => ({}),
          responseSerialize: () => Buffer.alloc(0),
          responseDeserialize: (bytes: Buffer) => HEALTH_STATUS[bytes[1] ?? 0] ?? 'UNKNOWN',
        },
      },
      'Health',
    );
    const client = new Health(this.address, grpc.credentials.createInsecure(), {
      channelOverride: this.raw.getChannel(),
    }) as unknown as {
      check: (req: object, cb: (err: grpc.ServiceError | null, status: string) => void) => void;
    };
    return new Promise((resolve, reject) =>
      client.check({}, (err, status) => (err ? reject(err) : resolve(status))),
    );
  }

  list(tenant = '', pageSize = 0, pageToken = ''): Promise<ListSessionsResponse> {
    return call(this.raw.listSessions.bind(this.raw), { tenant, pageSize, pageToken });
  }

  /** Opens a Watch stream that records every event per session. */
  watch(): Watcher {
    return new Watcher(this.raw.watch());
  }

  close(): void {
    this.raw.close();
  }
}

export class Watcher {
  /** Every token event received, per `tenant/user`, in arrival order. */
  readonly events = new Map<string, TokenEvent[]>();
  readonly errors: WatchError[] = [];
  ended = false;
  private listeners: (() => void)[] = [];

  constructor(readonly stream: grpc.ClientDuplexStream<WatchRequest, WatchResponse>) {
    stream.on('data', (response: WatchResponse) => {
      const event = response.event;
      if (event?.$case === 'token') {
        const key = `${event.value.tenant}/${event.value.user}`;
        const list = this.events.get(key) ?? [];
        list.push(event.value);
        this.events.set(key, list);
      } else if (event?.$case === 'error') this.errors.push(event.value);
      this.listeners.forEach((l) => l());
    });
    const end = () => {
      this.ended = true;
      this.listeners.forEach((l) => l());
    };
    stream.on('end', end);
    stream.on('error', end);
  }

  subscribe(tenant: string, user: string, afterGeneration = 0, epoch = ''): void {
    this.stream.write({
      action: { $case: 'subscribe', value: { tenant, user, afterGeneration, epoch } },
    });
  }

  unsubscribe(tenant: string, user: string): void {
    this.stream.write({ action: { $case: 'unsubscribe', value: { tenant, user } } });
  }

  of(tenant: string, user: string): TokenEvent[] {
    return this.events.get(`${tenant}/${user}`) ?? [];
  }

  latest(tenant: string, user: string): TokenEvent | undefined {
    return this.of(tenant, user).at(-1);
  }

  /** Resolves when `predicate` holds, rejects after `timeoutMs`. */
  until(predicate: () => boolean, timeoutMs = 10_000, what = 'watch condition'): Promise<void> {
    if (predicate()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = () => {
        if (!predicate()) return;
        clearTimeout(timer);
        this.listeners = this.listeners.filter((l) => l !== check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.listeners = this.listeners.filter((l) => l !== check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.listeners.push(check);
    });
  }

  close(): void {
    this.stream.cancel();
  }
}

/** Polls `predicate` until it holds. */
export async function eventually(
  predicate: () => boolean | Promise<boolean>,
  timeoutMs = 10_000,
  what = 'condition',
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await predicate())) {
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The gRPC error a call fails with; throws when it succeeds instead. */
export async function rpcError(call: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await call;
  } catch (err) {
    return err as grpc.ServiceError;
  }
  throw new Error('expected the call to fail');
}
