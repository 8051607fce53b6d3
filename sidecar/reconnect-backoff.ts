/** Reconnect timing for the Watch stream: exponential with "equal jitter", capped. */
export interface BackoffOptions {
  baseMs: number;
  maxMs: number;
}

/**
 * Delay before reconnect attempt `attempt` (0 for the first after a healthy stream): half the
 * exponential step fixed, half random, so sidecars that lost the same replica spread out.
 */
export function reconnectDelayMs(
  attempt: number,
  options: BackoffOptions,
  random: () => number = Math.random,
): number {
  const step = Math.min(options.maxMs, options.baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.round(step / 2 + (random() * step) / 2);
}
