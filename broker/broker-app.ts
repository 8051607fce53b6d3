import type { Meter } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { BrokerMetrics, FAMILY_END_HORIZONS } from './broker-metrics.js';
import type { AuthConfig, BrokerConfig } from './config.js';
import { ConfigError } from './errors.js';
import { redactUrl } from '../shared/env-reader.js';
import { AccessControl } from './auth/access-control.js';
import { PolicyFile } from './auth/policy-file.js';
import { ServiceAccountVerifier } from './auth/service-account-verifier.js';
import { BrokerGrpcServer } from './grpc/grpc-server.js';
import { serverTlsCredentials } from './grpc/server-tls.js';
import type { IdpAdapter } from './idp/idp-adapter.js';
import { createIdpAdapter } from './idp/idp-factory.js';
import { describeSemantics } from './idp/idp-profiles.js';
import { LoginSecrets } from './idp/login-secrets.js';
import type { LockService } from './lock/lock-service.js';
import { MemoryLockService } from './lock/memory-lock-service.js';
import { RedlockLockService } from './lock/redlock-lock-service.js';
import { RotationPolicy } from './rotation/rotation-policy.js';
import { DueWorker } from './rotation/due-worker.js';
import { Rotator } from './rotation/rotator.js';
import { generateSealingKey, parseSealingKeys, Sealer } from './sealing.js';
import { CacheInvalidatingStore, SESSION_CACHE_DEFAULTS, SessionCache } from './session-cache.js';
import { SessionService } from './session-service.js';
import { KeySpace } from './store/keys.js';
import { MemorySessionStore } from './store/memory-session-store.js';
import { RedisSessionStore } from './store/redis-session-store.js';
import { RetentionSweeper, retentionOptions } from './store/retention-sweeper.js';
import type { SessionStore } from './store/session-store.js';
import { WatchHub } from './watch-hub.js';

export interface RunningBroker {
  port: number;
  service: SessionService;
  /** Graceful stop: stop claiming, finish rotations, release locks, end streams. */
  stop(): Promise<void>;
}

export interface BrokerOverrides {
  /** Replace the configured IdP adapters (tests). */
  idps?: ReadonlyMap<string, IdpAdapter>;
  clock?: () => number;
  /** Where the broker's instruments live (tests and the demo read them back); default global. */
  meter?: Meter;
}

export async function startBroker(
  config: BrokerConfig,
  log: Logger,
  overrides: BrokerOverrides = {},
): Promise<RunningBroker> {
  const keys = new KeySpace(config.keyPrefix);
  const metrics = new BrokerMetrics(overrides.meter);
  // The policy and the issuer's keys load while Redis connects: start-up waits for the slower.
  const accessStarting = config.auth ? startAccessControl(config.auth, log) : undefined;
  accessStarting?.catch(() => {}); // Awaited below; a failure then is the one reported.
  const abandonAccess = () =>
    void accessStarting?.then(
      (a) => a.close(),
      () => {},
    );
  let store: SessionStore;
  let locks: LockService;
  if (config.stateStore) {
    const sealer = new Sealer(
      parseSealingKeys(config.sealingKeysText ?? '', config.sealingKeysSetting),
    );
    const redisStore = new RedisSessionStore(
      {
        target: config.stateStore,
        prefix: config.keyPrefix,
        minReplicas: config.redisMinReplicas,
        waitTimeoutMs: config.redisWaitTimeoutMs,
      },
      sealer,
      log,
      (code) => metrics.unreadableRecord(code),
    );
    const redlock = new RedlockLockService(
      {
        urls: config.redlockUrls,
        ttlMs: config.lock.ttlMs,
        extendBeforeMs: config.lock.extendBeforeMs,
        retryCount: config.lock.retryCount,
        retryDelayMs: config.lock.retryDelayMs,
        commandTimeoutMs: 500,
      },
      log,
    );
    // The state store and the lock nodes connect side by side.
    const quorum = redlock.waitForQuorum(5_000);
    const prepared = await redisStore
      .waitReady(config.redisConnectTimeoutMs)
      .then(() => redisStore.prepare())
      .catch(async (err: unknown) => {
        await Promise.all([redisStore.close(), redlock.close()]);
        abandonAccess();
        throw new ConfigError(
          redisStore.setting,
          `did not answer within ${config.redisConnectTimeoutMs} ms (TB_REDIS_CONNECT_TIMEOUT_MS): ${redactUrl((err as Error).message)}`,
        );
      });
    log.info(
      { shape: config.stateStore.kind, ...prepared },
      'state store ready: a commit counts once minReplicas replicas acknowledge it',
    );
    store = redisStore;
    locks = redlock;
    const ready = await quorum;
    if (ready <= config.redlockUrls.length / 2)
      log.error(
        { ready, nodes: config.redlockUrls.length },
        'no quorum of Redlock nodes reachable yet: rotations wait until one is (TB_REDLOCK_URLS)',
      );
    if (config.redlockUrls.length < 3)
      log.warn(
        { nodes: config.redlockUrls.length },
        'Redlock has fewer than 3 independent nodes: losing one loses the lock; set TB_REDLOCK_URLS',
      );
  } else {
    // Sealing is still exercised so embedded mode runs the same code path as production.
    void new Sealer([generateSealingKey('embedded')]);
    store = new MemorySessionStore();
    locks = new MemoryLockService(config.lock.ttlMs);
    log.warn(
      'EMBEDDED MODE: no TB_REDIS_URL, so state lives in this process only and only ONE replica ' +
        'may run. Not for production: set TB_REDIS_URL, TB_REDLOCK_URLS and TB_SEALING_KEYS.',
    );
  }

  // GetToken's copy of opened records: served only while the event stream is up (from the
  // subscription below), forgotten on every event and on every commit of its session here.
  const cache = new SessionCache(SESSION_CACHE_DEFAULTS, overrides.clock ?? Date.now, false);
  store = new CacheInvalidatingStore(store, cache);

  const idps =
    overrides.idps ??
    new Map<string, IdpAdapter>(config.idps.map((idp) => [idp.name, createIdpAdapter(idp)]));
  warnWithoutRevocation(idps, log);
  // The rotation's lock arithmetic must hold for the slowest IdP.
  const idpTimeoutMs = Math.max(...config.idps.map((idp) => idp.timeoutMs));
  const secrets = config.secretsDir ? new LoginSecrets(config.secretsDir) : undefined;
  const policy = new RotationPolicy(config.rotation);
  const clock = overrides.clock ?? Date.now;
  const rotator = new Rotator(
    {
      replica: config.replicaId,
      idpTimeoutMs,
      lockMarginMs: config.lock.marginMs,
      idleTimeoutMs: config.sessionIdleTimeoutMs,
      busyRetryMs: 250,
      persistRetryMs: config.persistRetryMs,
      loginAheadMs: config.loginAheadMs,
    },
    {
      store,
      locks,
      keys,
      idps,
      policy,
      metrics,
      log,
      clock,
      secrets,
      semantics: new Map(config.idps.map((idp) => [idp.name, idp])),
    },
  );
  // One line per IdP: which rotation semantics are in force (no secrets, no URLs).
  for (const idp of config.idps)
    log.info({ idp: idp.name, ...describeSemantics(idp) }, 'IdP rotation semantics');
  const hub = new WatchHub(store, log);
  metrics.observe({
    sessionCounts: () => store.sessionCounts(),
    watchers: () => hub.watcherCount,
    familyEnding: () =>
      store.familyEndCounts(
        clock(),
        FAMILY_END_HORIZONS.map((h) => h.ms),
      ),
  });
  await store.subscribe(
    (event) => {
      cache.onEvent(event);
      hub.onEvent(event);
    },
    () => {
      cache.up();
      hub.resync();
    },
    () => cache.down(),
  );
  cache.up();
  const service = new SessionService(
    {
      defaultIdp: config.idp.name,
      refreshMinIntervalMs: config.refreshMinIntervalMs,
      refreshWaitMs: config.refreshWaitMs,
      touchIntervalMs: Math.max(100, Math.min(60_000, config.sessionIdleTimeoutMs / 10)),
      idpTimeoutMs,
    },
    {
      store,
      locks,
      keys,
      idps,
      rotator,
      hub,
      log,
      clock,
      secrets,
      cache,
      countRead: (result) => metrics.tokenRead(result),
    },
  );
  const worker = new DueWorker(config.worker, store, rotator, log, clock, metrics);
  const sweeper = new RetentionSweeper(
    retentionOptions(config.sessionRetentionMs),
    store,
    log,
    clock,
  );
  const access = await accessStarting?.catch(async (err: unknown) => {
    service.close();
    await store.close();
    await locks.close();
    throw err;
  });
  const credentials = config.tls ? serverTlsCredentials(config.tls, log) : undefined;
  const grpcServer = new BrokerGrpcServer({
    sessions: service,
    hub,
    log,
    access,
    credentials,
    watchLimits: config.watch,
    connectionAge: config.connectionAge,
  });
  const port = await grpcServer.listen(config.grpcAddress).catch(async (err: unknown) => {
    service.close();
    await store.close();
    await locks.close();
    access?.close();
    // grpc-js says "No address added out of total 1 resolved" with the reason after it.
    throw new ConfigError(
      'TB_GRPC_ADDRESS',
      `cannot be listened on (${config.grpcAddress}): ${(err as Error).message}`,
    );
  });
  const stopWorker = new AbortController();
  const working = worker.run(stopWorker.signal);
  const sweeping = sweeper.run(stopWorker.signal);
  const watchingPolicy = access?.run(stopWorker.signal);
  const insecure = warnWhileInsecure(config, log);
  log.info(
    {
      port,
      replica: config.replicaId,
      mode: config.stateStore ? `redis-${config.stateStore.kind}` : 'embedded',
      tls: config.tls !== undefined,
      auth: config.auth !== undefined,
    },
    'broker serving',
  );

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      log.info('broker stopping: no new claims, finishing in-flight rotations');
      service.close();
      grpcServer.setServing(false);
      stopWorker.abort();
      clearInterval(insecure);
      await working;
      await sweeping;
      await watchingPolicy;
      await rotator.drain();
      await grpcServer.shutdown(config.shutdownGraceMs);
      await store.close();
      await locks.close();
      access?.close();
      log.info('broker stopped');
    })());
  return { port, service, stop };
}

/** Loads the policy (the broker does not start without a valid one) and the issuer's keys. */
async function startAccessControl(auth: AuthConfig, log: Logger): Promise<AccessControl> {
  const policy = new PolicyFile(auth.policyFile, { log });
  const rules = policy.load();
  const verifier = new ServiceAccountVerifier(
    {
      issuer: auth.issuer,
      audience: auth.audience,
      discovery: auth.discovery,
      jwksFile: auth.jwksFile,
      issuerCaFile: auth.issuerCaFile,
      issuerTokenFile: auth.issuerTokenFile,
    },
    { log },
  );
  await verifier.start();
  log.info(
    { issuer: auth.issuer, audience: auth.audience, rules: rules.ruleCount },
    'caller authentication on: every call but health needs a ServiceAccount token the policy allows',
  );
  return new AccessControl(verifier, policy, log);
}

/**
 * One warning line per IdP that has no revocation endpoint (configured or discovered): Revoke
 * then forgets the refresh token but cannot end it at the IdP. Runs in the background, since
 * discovery may take a while; a failed check is reported too (Revoke says it again per call).
 */
function warnWithoutRevocation(idps: ReadonlyMap<string, IdpAdapter>, log: Logger): void {
  for (const idp of idps.values()) {
    if (!idp.revocationProblem) continue;
    idp.revocationProblem(AbortSignal.timeout(10_000)).then(
      (problem) => {
        if (problem !== undefined)
          log.warn(
            { idp: idp.name, problem },
            `IdP ${JSON.stringify(idp.name)} has no revocation endpoint: Revoke forgets a session's refresh token but cannot revoke it there (it keeps working until it expires); set TB_IDP_REVOCATION_ENDPOINT if the IdP has one`,
          );
      },
      (err: unknown) =>
        log.warn(
          { idp: idp.name, err: (err as Error).message },
          `could not find out whether IdP ${JSON.stringify(idp.name)} has a revocation endpoint (discovery failed); Revoke reports it per call`,
        ),
    );
  }
}

const INSECURE_REMINDER_MS = 5 * 60_000;

/**
 * Says loudly, at start and every few minutes, that TLS or caller authentication is off (an
 * explicit TB_TLS=off or TB_AUTH=off, or embedded mode without certificates).
 */
function warnWhileInsecure(config: BrokerConfig, log: Logger): NodeJS.Timeout | undefined {
  const problems: string[] = [];
  if (!config.tls)
    problems.push(
      'TLS is OFF: access and refresh tokens cross the network in clear (set TB_TLS_CERT_FILE and TB_TLS_KEY_FILE)',
    );
  if (!config.auth)
    problems.push(
      'caller authentication is OFF (TB_AUTH=off): anyone who reaches the broker can read, replace or revoke any session',
    );
  if (problems.length === 0) return undefined;
  const warn = () => {
    for (const problem of problems) log.warn(`INSECURE: ${problem}. Not for production.`);
  };
  warn();
  const timer = setInterval(warn, INSECURE_REMINDER_MS);
  timer.unref();
  return timer;
}
