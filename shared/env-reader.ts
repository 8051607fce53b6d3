/**
 * Reads settings from environment variables (or any name -> string map) for the broker and the
 * sidecar. Each process passes its own error constructor, so a bad value fails with that
 * process's ConfigError naming the exact setting.
 */
export type Env = Record<string, string | undefined>;

export type SettingError = (setting: string, problem: string) => Error;

/** The longest delay a Node.js timer takes; a larger one fires at once (and a loop spins). */
export const MAX_TIMER_MS = 2 ** 31 - 1;

export interface IntBounds {
  min: number;
  /** Default MAX_TIMER_MS: every whole-number setting is a delay or a count that fits a timer. */
  max?: number;
  /** Why the minimum exists, appended to the error. */
  why?: string;
  /** What the number counts, for the "must be a whole number" error. */
  unit?: string;
}

export class EnvReader {
  constructor(
    private readonly env: Env,
    private readonly fail: SettingError,
  ) {}

  /** The trimmed value; undefined when unset or blank. */
  string(name: string): string | undefined {
    const value = this.env[name]?.trim();
    return value ? value : undefined;
  }

  required(name: string): string {
    const value = this.string(name);
    if (!value) throw this.fail(name, 'is required');
    return value;
  }

  /** A comma-separated list, blanks dropped. */
  list(name: string): string[] {
    return (this.string(name) ?? '')
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
  }

  url(name: string, protocols: string[]): string | undefined {
    const value = this.string(name);
    if (value) checkUrl(name, value, protocols, this.fail);
    return value;
  }

  number(name: string, fallback: number): number {
    const raw = this.string(name);
    if (raw === undefined) return fallback;
    const value = Number(raw);
    if (!Number.isFinite(value))
      throw this.fail(name, `must be a number, got ${JSON.stringify(raw)}`);
    return value;
  }

  int(name: string, fallback: number, bounds: IntBounds): number {
    const raw = this.string(name);
    if (raw === undefined) return fallback;
    if (!/^\d+$/.test(raw))
      throw this.fail(
        name,
        `must be a whole number${bounds.unit ? ` ${bounds.unit}` : ''}, got ${JSON.stringify(raw)}`,
      );
    const value = Number(raw);
    if (value < bounds.min)
      throw this.fail(
        name,
        `must be at least ${bounds.min}${bounds.why ? ` (${bounds.why})` : ''}, got ${value}`,
      );
    const max = bounds.max ?? MAX_TIMER_MS;
    if (value > max) throw this.fail(name, `must be at most ${max}, got ${raw}`);
    return value;
  }

  oneOf<T extends string>(name: string, allowed: readonly T[], fallback: T): T {
    const raw = this.string(name);
    if (raw === undefined) return fallback;
    if (!(allowed as readonly string[]).includes(raw))
      throw this.fail(name, `must be one of ${allowed.join(', ')}, got ${JSON.stringify(raw)}`);
    return raw as T;
  }

  /** `on` or `off` (also true/false, 1/0); only an explicit value turns a safeguard off. */
  onOff(name: string, fallback: boolean): boolean {
    const raw = this.string(name)?.toLowerCase();
    if (raw === undefined) return fallback;
    if (['on', 'true', '1'].includes(raw)) return true;
    if (['off', 'false', '0'].includes(raw)) return false;
    throw this.fail(name, `must be on or off, got ${JSON.stringify(raw)}`);
  }
}

export function checkUrl(
  setting: string,
  value: string,
  protocols: string[],
  fail: SettingError,
): void {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw fail(setting, `must be a URL, got ${JSON.stringify(redactUrl(value))}`);
  }
  if (!protocols.includes(url.protocol))
    throw fail(setting, `must be a ${protocols.join(' or ')} URL, got ${url.protocol}`);
}

/**
 * Hides a password in a URL-ish string before it goes into an error. Everything up to the last
 * '@' goes: an unparseable URL often holds a password with an unencoded '/' or '@'.
 */
export function redactUrl(value: string): string {
  return value.replace(/\/\/[^]*@/, '//***@');
}
