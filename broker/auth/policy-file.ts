/**
 * The policy file (TB_POLICY_FILE), kept current while the broker runs. A Kubernetes ConfigMap
 * mount changes by swapping a `..data` symlink, which a watch on the file itself never sees, so
 * the file's content hash is polled; a watch on its directory only makes the poll come sooner.
 * A change that does not parse (or a file that vanished) is refused and the last good policy stays.
 */
import { createHash } from 'node:crypto';
import { readFileSync, watch, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { ConfigError, PolicyError } from '../errors.js';
import { AccessPolicy } from './access-policy.js';

const SETTING = 'TB_POLICY_FILE';
/** A policy is a few kilobytes; anything far larger is a wrong path, not a policy. */
const MAX_BYTES = 1024 * 1024;
/** A changed file must read the same twice this far apart: an in-place write is not half-read. */
const SETTLE_MS = 100;

export interface PolicyFileDeps {
  log: Logger;
  /** How often the file's content is compared; default 2000 ms. */
  pollMs?: number;
}

export class PolicyFile {
  private readonly log: Logger;
  private readonly pollMs: number;
  private policy: AccessPolicy | undefined;
  /** Hash of what was last read, good or bad, so each distinct content is judged and logged once. */
  private seen: string | undefined;
  /** Why the file could not be read last time, so a lasting outage is logged once. */
  private unreadable: string | undefined;
  /** Set by a directory event; makes the next wait end at once (the event may come mid-check). */
  private poked = false;
  private wake: (() => void) | undefined;

  constructor(
    readonly path: string,
    deps: PolicyFileDeps,
  ) {
    this.log = deps.log;
    this.pollMs = deps.pollMs ?? 2000;
  }

  /**
   * Reads and parses the file once. Throws PolicyError (a broken policy) or ConfigError (no
   * readable file): the broker must not start without a valid policy.
   */
  load(): AccessPolicy {
    let bytes: Buffer;
    try {
      bytes = readFileSync(this.path);
    } catch (err) {
      throw new ConfigError(SETTING, `${this.path} cannot be read (${errorCode(err)})`);
    }
    if (bytes.length > MAX_BYTES)
      throw new ConfigError(SETTING, `${this.path} is larger than ${MAX_BYTES} bytes`);
    const policy = AccessPolicy.parse(bytes.toString('utf8'), this.path);
    this.install(policy, hash(bytes), 'access policy loaded');
    return policy;
  }

  current(): AccessPolicy {
    if (!this.policy) throw new Error('PolicyFile.current() called before load()');
    return this.policy;
  }

  /** Watches the file until `signal` aborts; never throws for a bad or missing file. */
  async run(signal: AbortSignal): Promise<void> {
    if (!this.policy) throw new Error('PolicyFile.run() called before load()');
    const watcher = this.watchDirectory();
    try {
      while (!signal.aborted) {
        try {
          await this.check(signal);
        } catch (err) {
          // Not a policy problem (those are PolicyErrors): still never stop watching over it.
          this.log.error(
            { policyFile: this.path, err: errorCode(err) },
            'access policy check failed; the last good policy stays in force',
          );
        }
        await this.nextCheck(signal);
      }
    } finally {
      watcher?.close();
    }
  }

  /** Reads the file and installs it if it changed and parses; logs and keeps the old one if not. */
  private async check(signal: AbortSignal): Promise<void> {
    let bytes = await this.read();
    if (bytes === undefined) return;
    let digest = hash(bytes);
    if (digest === this.seen) return;
    // Read again shortly: an editor writing in place could have been caught halfway, and a cut
    // policy can grant more than the whole one (`folio/mod-*-import` cut to `folio/mod-*`).
    for (;;) {
      await sleep(SETTLE_MS, undefined, { signal }).catch(() => undefined);
      if (signal.aborted) return;
      const again = await this.read();
      if (again === undefined) return;
      const againDigest = hash(again);
      if (againDigest === digest) break;
      bytes = again;
      digest = againDigest;
    }
    this.seen = digest;
    let policy: AccessPolicy;
    try {
      policy = AccessPolicy.parse(bytes.toString('utf8'), this.path);
    } catch (err) {
      if (!(err instanceof PolicyError)) throw err;
      this.log.error(
        { policyFile: this.path, line: err.line, field: err.field, rules: this.policy?.ruleCount },
        `access policy change refused, the last good policy stays in force: ${err.message}`,
      );
      return;
    }
    this.install(policy, digest, 'access policy reloaded');
  }

  private install(policy: AccessPolicy, digest: string, message: string): void {
    this.policy = policy;
    this.seen = digest;
    this.log.info({ policyFile: this.path, rules: policy.ruleCount }, message);
    if (policy.ruleCount === 0)
      this.log.warn(
        { policyFile: this.path },
        'access policy has no rules: every call but health is denied',
      );
  }

  /** The file's bytes, or undefined (logged once per outage) when it cannot be read. */
  private async read(): Promise<Buffer | undefined> {
    let bytes: Buffer;
    try {
      bytes = await readFile(this.path);
    } catch (err) {
      return this.refuseUnreadable(`cannot be read (${errorCode(err)})`);
    }
    if (bytes.length > MAX_BYTES) return this.refuseUnreadable(`is larger than ${MAX_BYTES} bytes`);
    if (this.unreadable !== undefined) {
      this.unreadable = undefined;
      this.log.info({ policyFile: this.path }, 'access policy file is readable again');
    }
    return bytes;
  }

  private refuseUnreadable(problem: string): undefined {
    if (this.unreadable !== problem) {
      this.unreadable = problem;
      this.log.error(
        { policyFile: this.path, rules: this.policy?.ruleCount },
        `access policy file ${problem}; the last good policy stays in force`,
      );
    }
    return undefined;
  }

  private watchDirectory(): FSWatcher | undefined {
    try {
      const watcher = watch(dirname(this.path), { persistent: false }, () => {
        this.poked = true;
        this.wake?.();
      });
      // Polling still works without the watch (e.g. out of inotify watches): not worth more.
      watcher.on('error', (err) => {
        this.log.debug(
          { policyFile: this.path, err: errorCode(err) },
          'policy directory watch ended',
        );
        watcher.close();
      });
      return watcher;
    } catch (err) {
      this.log.debug(
        { policyFile: this.path, err: errorCode(err) },
        'policy directory cannot be watched; polling only',
      );
      return undefined;
    }
  }

  /** Waits for the poll interval, a directory event, or the abort, whichever comes first. */
  private async nextCheck(signal: AbortSignal): Promise<void> {
    if (this.poked || signal.aborted) {
      this.poked = false;
      return;
    }
    const woken = new AbortController();
    const wake = () => woken.abort();
    signal.addEventListener('abort', wake, { once: true });
    this.wake = wake;
    try {
      await sleep(this.pollMs, undefined, { signal: woken.signal });
    } catch {
      // woken early: by a directory event or the abort
    } finally {
      this.wake = undefined;
      this.poked = false;
      signal.removeEventListener('abort', wake);
    }
  }
}

function hash(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function errorCode(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : err instanceof Error ? err.message : String(err);
}
