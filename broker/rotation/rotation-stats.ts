/**
 * In-process counters of the rotation path, read by logs, tests and (later) metrics exporters.
 * Latency samples are kept in a bounded ring so a long-running broker does not grow.
 */
export class SampleRing {
  private readonly values: number[] = [];
  private next = 0;

  constructor(private readonly size = 1024) {}

  push(value: number): void {
    if (this.values.length < this.size) this.values.push(value);
    else this.values[this.next] = value;
    this.next = (this.next + 1) % this.size;
  }

  snapshot(): number[] {
    return [...this.values];
  }
}

export class RotationStats {
  rotations = 0;
  idpCalls = 0;
  retries = 0;
  reauth = 0;
  takeovers = 0;
  /** Orphaned refresh tokens checked with the IdP before presenting them again. */
  introspections = 0;
  /** ...of which the IdP had already consumed (the session could not be saved). */
  consumedByLostAttempt = 0;
  reuseSuspicions = 0;
  persistFailures = 0;
  readonly lockWaitMs = new SampleRing();
  readonly idpLatencyMs = new SampleRing();
}
