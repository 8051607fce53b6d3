import { lstat, rm } from 'node:fs/promises';
import type { Server } from 'node:http';
import type { Logger } from 'pino';
import { http as nodeHttp } from '../shared/node-http.js';
import { openMetricsEndpoint } from '../shared/telemetry/metrics-endpoint.js';
import { connectBroker } from './broker-client.js';
import { BrokerLink, type BrokerApi } from './broker-link.js';
import { isAllowedUser, type SidecarConfig } from './config.js';
import { ConfigError, TooManyUsersError, UserNotAllowedError } from './errors.js';
import { SidecarHttpApi, type Readiness, type TokenSessions } from './http-api.js';
import { OtelSidecarMetrics } from './metrics.js';
import { TokenFileSink } from './token-file-sink.js';
import { TokenStore, type UserEntry } from './token-store.js';

export interface RunningSidecar {
  /** The bound TCP port, or undefined when serving on a Unix socket. */
  readonly port: number | undefined;
  readonly socketPath: string | undefined;
  /** Graceful stop: answers waiting reads, closes the HTTP server and the broker stream. */
  stop(): Promise<void>;
}

const STOP_GRACE_MS = 5_000;

/** Wires store, broker stream, HTTP API and file sink, and starts serving. */
export async function startSidecar(
  config: SidecarConfig,
  log: Logger,
  api: BrokerApi = connectBroker(
    {
      address: config.brokerAddress,
      keepaliveMs: config.keepaliveMs,
      reconnectMaxMs: config.reconnectMaxMs,
      tls: config.brokerTls,
      tokenFile: config.tokenFile,
    },
    log,
  ),
): Promise<RunningSidecar> {
  const clock = Date.now;
  const sink = config.tokenDir ? new TokenFileSink(config.tokenDir, log) : undefined;
  const store: TokenStore = new TokenStore({
    safetySkewMs: config.safetySkewMs,
    onApplied: (entry) => {
      if (entry.pinned) sink?.update(entry, store.isFresh(entry));
    },
    onSkewShrunk: (entry, skew) => {
      log.warn(
        {
          tenant: entry.tenant,
          user: entry.user,
          lifetimeMs: skew.lifetimeMs,
          configuredSkewMs: skew.configuredMs,
          skewMs: skew.skewMs,
        },
        'access tokens of this user live too briefly for TB_SIDECAR_SAFETY_SKEW_MS: serving them until a quarter of their lifetime before expiry instead',
      );
    },
  });

  const metricsEndpoint = openMetricsEndpoint('token-broker-sidecar');
  const metrics = new OtelSidecarMetrics(metricsEndpoint, {
    streamUp: (): boolean => link.up,
    streamsUp: (): number => link.streamsUp,
    watchedUsers: () => store.size,
    freshUsers: () => [...store.all()].filter((e) => store.isFresh(e)).length,
    reauthRequiredUsers: () =>
      [...store.all()].filter((e) => e.state?.status === 'REAUTH_REQUIRED').length,
  });
  const link: BrokerLink = new BrokerLink(
    api,
    store,
    {
      reconnectBaseMs: 200,
      reconnectMaxMs: config.reconnectMaxMs,
      refreshTimeoutMs: 10_000,
      refreshRetryMs: 1_000,
    },
    log,
    metrics,
  );
  for (const ref of config.users) store.ensure(ref, true);
  if (!config.allowedUsers)
    log.warn(
      'neither TB_SIDECAR_ALLOWED_USERS nor TB_SIDECAR_USERS is set: any local process may read any user the broker lets this sidecar read',
    );
  if (config.brokerTls === 'off')
    log.warn(
      'INSECURE: TB_SIDECAR_BROKER_TLS=off: tokens cross the network in clear. Not for production.',
    );

  const sessions: TokenSessions = {
    read(ref) {
      const known = store.get(ref.tenant, ref.user);
      if (known) {
        known.lastReadAt = clock();
        return known;
      }
      // A new user is refused before anything is subscribed: the broker is never asked for it.
      if (!isAllowedUser(config.allowedUsers, ref)) throw new UserNotAllowedError(ref.tenant);
      if (store.size >= config.maxUsers) throw new TooManyUsersError(config.maxUsers);
      const { entry, created } = store.ensure(ref);
      entry.lastReadAt = clock();
      if (created) {
        link.subscribe(entry);
        log.debug({ tenant: ref.tenant, user: ref.user }, 'subscribed on first read');
      }
      return entry;
    },
    requestRefresh: (entry, generation) => link.requestRefresh(entry, generation),
    fetchCurrent: (entry) => link.fetchCurrent(entry),
  };

  const readiness = (): Readiness => {
    const now = clock();
    const users: Record<string, string> = {};
    let allFresh = true;
    let allHaveToken = true;
    for (const ref of config.users) {
      const entry = store.get(ref.tenant, ref.user);
      const state = entry?.state;
      const fresh = entry !== undefined && store.isFresh(entry, now);
      const hasToken =
        state?.status === 'ACTIVE' && state.accessToken !== '' && state.expiresAtMs > now;
      allFresh &&= fresh;
      allHaveToken &&= hasToken;
      users[`${ref.tenant}/${ref.user}`] = fresh
        ? 'fresh'
        : hasToken
          ? 'expiring'
          : state && state.status !== 'ACTIVE'
            ? state.status
            : entry?.notFound
              ? 'SESSION_NOT_FOUND'
              : 'missing';
    }
    const up = link.up;
    // With listed users: each has a token, and the stream is up or every token is still fresh.
    const ready = config.users.length === 0 ? up : allHaveToken && (up || allFresh);
    return {
      ready,
      body: { ready, broker: { up, peer: link.peer || null, peers: link.peers }, users },
    };
  };

  const http = new SidecarHttpApi({
    store,
    sessions,
    readiness,
    metrics,
    log,
    maxWaitMs: config.maxWaitMs,
    maxUsers: config.maxUsers,
  });
  // The API answers a missing Host itself: none is fine on the Unix socket, not over TCP.
  const server = nodeHttp.createServer({ requireHostHeader: false }, http.handle);
  server.on('clientError', http.clientError);
  await listen(server, config);
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : undefined;
  http.listening(config.socketPath ? { socket: config.socketPath } : { port: port! });

  const controller = new AbortController();
  const running = link.run(controller.signal).catch((err: unknown) => {
    log.error({ err: String(err) }, 'broker link failed');
  });

  const unsubscribe = (entry: UserEntry) => {
    link.unsubscribe(entry);
    store.remove(entry);
    log.info({ tenant: entry.tenant, user: entry.user }, 'unsubscribed a user not read lately');
  };
  const sweepMs = Math.max(250, Math.min(60_000, Math.floor(config.idleUnsubscribeMs / 4)));
  const sweep = setInterval(() => {
    for (const entry of store.idleSince(config.idleUnsubscribeMs)) {
      if (entry.waiters.size > 0) continue;
      unsubscribe(entry);
    }
  }, sweepMs);
  sweep.unref();

  let stopping: Promise<void> | undefined;
  return {
    port: config.socketPath ? undefined : port,
    socketPath: config.socketPath,
    stop: () =>
      (stopping ??= (async () => {
        clearInterval(sweep);
        http.close();
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeIdleConnections();
        controller.abort();
        await running;
        api.close();
        await sink?.close();
        const timer = setTimeout(() => server.closeAllConnections(), STOP_GRACE_MS);
        await closed;
        clearTimeout(timer);
        await metricsEndpoint.shutdown();
      })()),
  };
}

async function listen(server: Server, config: SidecarConfig): Promise<void> {
  if (config.socketPath) {
    // A socket file left by a previous run would make the bind fail.
    const existing = await lstat(config.socketPath).catch(() => undefined);
    if (existing?.isSocket()) await rm(config.socketPath, { force: true });
  }
  await new Promise<void>((resolve, reject) => {
    const failed = (err: NodeJS.ErrnoException) => {
      const [setting, where] = config.socketPath
        ? ['TB_SIDECAR_SOCKET', config.socketPath]
        : ['TB_SIDECAR_PORT', `127.0.0.1:${config.port}`];
      reject(
        new ConfigError(setting, `cannot be listened on (${where}): ${err.code ?? err.message}`),
      );
    };
    server.once('error', failed);
    const done = () => {
      server.off('error', failed);
      resolve();
    };
    if (config.socketPath) server.listen(config.socketPath, done);
    else server.listen(config.port, '127.0.0.1', done);
  });
}
