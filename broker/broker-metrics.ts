/**
 * The broker's OpenTelemetry metrics. Instruments come from the global meter, so with telemetry
 * off they cost nothing; with OTEL_METRICS_EXPORTER=prometheus they appear on that endpoint with
 * these names (counters gain `_total`). No attribute ever carries a token, tenant or user.
 */
import { metrics, type Meter } from '@opentelemetry/api';

/** What the gauges read when metrics are collected. */
export interface BrokerGaugeSources {
  /** Cluster-wide session counts (one cheap store call per collection). */
  sessionCounts(): Promise<{ active: number; reauthRequired: number }>;
  /** Watch subscriptions served by this replica. */
  watchers(): number;
  /**
   * Cluster-wide, per FAMILY_END_HORIZONS entry: sessions with no login to fall back on whose
   * token family ends within that horizon (SessionStore.familyEndCounts).
   */
  familyEnding?(): Promise<number[]>;
}

/**
 * The horizons of `tb_broker_sessions_family_ending{within=...}`: a fixed, small set, so an alert
 * can pick one without any user label. Keycloak reports the smaller of its SSO session idle and
 * maximum in refresh_expires_in, so pick a horizon below the idle timeout (30 min by default).
 */
export const FAMILY_END_HORIZONS: readonly { within: string; ms: number }[] = [
  { within: '15m', ms: 15 * 60_000 },
  { within: '1h', ms: 60 * 60_000 },
  { within: '24h', ms: 24 * 60 * 60_000 },
];

/**
 * Every outcome a rotation can have (Rotator's RotationOutcome, and the two ways it throws). Each
 * series starts at 0, so rate() and alerts see it before its first occurrence.
 */
const ROTATION_OUTCOMES = [
  'rotated',
  'not-needed',
  'reauth-required',
  'retry-scheduled',
  'busy',
  'inactive',
  'went-idle',
  'not-found',
  'persist-failed',
  'lock-unavailable',
  'error',
];

/** tb_broker_token_reads' attribute sets, made once: GetToken is the hottest call. */
const TOKEN_READ = { hit: { result: 'hit' }, miss: { result: 'miss' } } as const;

const UNREADABLE_CODES = ['SEALING_KEY_UNKNOWN', 'SEAL_INVALID'] as const;

const INTROSPECTION_RESULTS = ['active', 'consumed', 'unknown', 'failed'] as const;

/** How a presentation whose answer was lost was resolved (issue 12's order). */
export const OUTCOME_UNKNOWN_RESOLUTIONS = [
  'introspected-active',
  'introspected-consumed',
  'grace-represented',
  'represented-once',
  'deferred',
] as const;
export type OutcomeUnknownResolution = (typeof OUTCOME_UNKNOWN_RESOLUTIONS)[number];

const SECONDS_FAST = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
const SECONDS_IDP = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const SECONDS_LAG = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

export class BrokerMetrics {
  private readonly rotations;
  private readonly idpDuration;
  private readonly lockWaitSeconds;
  private readonly dueLagSeconds;
  private readonly reuseSuspicions;
  private readonly persistFailures;
  private readonly takeovers;
  private readonly introspections;
  private readonly introspectionUnusableGauge;
  private readonly outcomeUnknowns;
  private readonly unreadableRecords;
  private readonly tokenReads;

  constructor(private readonly meter: Meter = metrics.getMeter('token-broker')) {
    this.rotations = meter.createCounter('tb_broker_rotations', {
      description: 'Rotation attempts by outcome (rotated, reauth-required, retry-scheduled, ...).',
    });
    this.idpDuration = meter.createHistogram('tb_broker_idp_request_duration_seconds', {
      description: 'IdP refresh and login calls by outcome (ok or the error code).',
      unit: 's',
      advice: { explicitBucketBoundaries: SECONDS_IDP },
    });
    this.lockWaitSeconds = meter.createHistogram('tb_broker_lock_wait_seconds', {
      description: "Time to take a session's lock before a rotation.",
      unit: 's',
      advice: { explicitBucketBoundaries: SECONDS_FAST },
    });
    this.dueLagSeconds = meter.createHistogram('tb_broker_due_lag_seconds', {
      description: 'Due-queue lag: when a session was claimed minus when it was due.',
      unit: 's',
      advice: { explicitBucketBoundaries: SECONDS_LAG },
    });
    this.reuseSuspicions = meter.createCounter('tb_broker_reuse_suspicions', {
      description:
        'Generation moved under a held lock: a refresh token may have been presented twice.',
    });
    this.persistFailures = meter.createCounter('tb_broker_persist_failures', {
      description: 'The IdP answered but the new token pair could not be stored.',
    });
    this.takeovers = meter.createCounter('tb_broker_takeovers', {
      description:
        'Rotations that took over a presentation whose replica ended without an outcome (died?).',
    });
    this.introspections = meter.createCounter('tb_broker_introspections', {
      description:
        'IdP introspections of a refresh token whose last presentation had no known outcome, by result (active, consumed, unknown, failed).',
    });
    this.introspectionUnusableGauge = meter.createGauge('tb_broker_introspection_unusable', {
      description:
        'Per IdP: 1 when introspection answered that a refresh token the broker had just received was inactive, so it is not used to resolve lost answers; 0 while usable or not yet probed.',
    });
    this.outcomeUnknowns = meter.createCounter('tb_broker_outcome_unknown', {
      description:
        'Refresh presentations whose answer was lost, by resolution (introspected-active, introspected-consumed, grace-represented, represented-once, deferred).',
    });
    for (const resolution of OUTCOME_UNKNOWN_RESOLUTIONS)
      this.outcomeUnknowns.add(0, { resolution });
    this.unreadableRecords = meter.createCounter('tb_broker_unreadable_records', {
      description:
        'Session records no configured sealing key opens, by code (SEALING_KEY_UNKNOWN: a kid not in TB_SEALING_KEYS; SEAL_INVALID: tampered or corrupt).',
    });
    for (const code of UNREADABLE_CODES) this.unreadableRecords.add(0, { code });
    this.tokenReads = meter.createCounter('tb_broker_token_reads', {
      description:
        'GetToken calls by source: hit (answered from the in-memory copy kept current by events), miss (read from the state store).',
    });
    for (const attributes of Object.values(TOKEN_READ)) this.tokenReads.add(0, attributes);
    for (const outcome of ROTATION_OUTCOMES) this.rotations.add(0, { outcome });
    for (const result of INTROSPECTION_RESULTS) this.introspections.add(0, { result });
    this.takeovers.add(0);
    this.reuseSuspicions.add(0);
    this.persistFailures.add(0);
  }

  tokenRead(result: 'hit' | 'miss'): void {
    this.tokenReads.add(1, TOKEN_READ[result]);
  }

  rotation(outcome: string): void {
    this.rotations.add(1, { outcome });
  }

  idpCall(kind: 'refresh' | 'login', outcome: string, ms: number): void {
    this.idpDuration.record(ms / 1000, { kind, outcome });
  }

  lockWait(ms: number): void {
    this.lockWaitSeconds.record(ms / 1000);
  }

  dueLag(ms: number): void {
    this.dueLagSeconds.record(Math.max(0, ms) / 1000);
  }

  unreadableRecord(code: (typeof UNREADABLE_CODES)[number]): void {
    this.unreadableRecords.add(1, { code });
  }

  reuseSuspicion(): void {
    this.reuseSuspicions.add(1);
  }

  persistFailure(): void {
    this.persistFailures.add(1);
  }

  takeover(): void {
    this.takeovers.add(1);
  }

  introspection(result: (typeof INTROSPECTION_RESULTS)[number]): void {
    this.introspections.add(1, { result });
  }

  introspectionUnusable(idp: string, unusable: boolean): void {
    this.introspectionUnusableGauge.record(unusable ? 1 : 0, { idp });
  }

  outcomeUnknown(resolution: OutcomeUnknownResolution): void {
    this.outcomeUnknowns.add(1, { resolution });
  }

  /** Registers the gauges; a failed read skips that collection instead of failing it. */
  observe(sources: BrokerGaugeSources): void {
    const active = this.meter.createObservableGauge('tb_broker_sessions_active', {
      description: 'Sessions being kept fresh (ACTIVE, in the due queue), cluster-wide.',
    });
    const reauth = this.meter.createObservableGauge('tb_broker_sessions_reauth_required', {
      description: 'Sessions in REAUTH_REQUIRED (their token family is dead), cluster-wide.',
    });
    const watchers = this.meter.createObservableGauge('tb_broker_watchers', {
      description: 'Watch subscriptions (stream x session) served by this replica.',
    });
    const familyEnding = this.meter.createObservableGauge('tb_broker_sessions_family_ending', {
      description:
        'ACTIVE sessions with no login to fall back on whose token family ends (refresh_token_expires_at) within the `within` horizon, ended ones included, cluster-wide. They need a new enrollment before then.',
    });
    this.meter.addBatchObservableCallback(
      async (result) => {
        result.observe(watchers, sources.watchers());
        const [counts, ending] = await Promise.all([
          sources.sessionCounts().catch(() => undefined),
          sources.familyEnding?.().catch(() => undefined),
        ]);
        if (ending)
          FAMILY_END_HORIZONS.forEach(({ within }, i) =>
            result.observe(familyEnding, ending[i] ?? 0, { within }),
          );
        if (!counts) return;
        result.observe(active, counts.active);
        result.observe(reauth, counts.reauthRequired);
      },
      [active, reauth, watchers, familyEnding],
    );
  }
}
