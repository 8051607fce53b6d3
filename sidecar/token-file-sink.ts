import { createHash, randomBytes } from 'node:crypto';
import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { UserEntry } from './token-store.js';

interface FileState {
  readonly tenant: string;
  readonly user: string;
  readonly dir: string;
  readonly path: string;
  /** What the file should hold: a token, or nothing (removed). */
  want: { token: string; generation: number } | null;
  /** What the file holds now (by identity of `want`). */
  done: { token: string; generation: number } | null;
  running: Promise<void> | undefined;
  expiry: NodeJS.Timeout | undefined;
}

/** The longest file name (bytes) Linux file systems take (NAME_MAX). */
export const NAME_MAX = 255;

/**
 * The file (or directory) name of a tenant or user id: the id itself, or, when its UTF-8 form is
 * longer than NAME_MAX (an id may have 256 characters, of several bytes each),
 * `sha256-<hex of the SHA-256 of its UTF-8 bytes>`. README.md ("File sink") documents this.
 */
function tokenFileName(id: string): string {
  return Buffer.byteLength(id) <= NAME_MAX
    ? id
    : `sha256-${createHash('sha256').update(id, 'utf8').digest('hex')}`;
}

/**
 * Writes each listed user's access token to `<dir>/<tenant>/<user>` (names per `tokenFileName`) (mode 0600, a temporary file
 * renamed into place, so a reader sees a whole token or the previous one), and removes the file
 * when the token has no more than its safety skew left, like the HTTP API stops serving it.
 */
export class TokenFileSink {
  private readonly files = new Map<string, FileState>();
  private closed = false;

  constructor(
    private readonly root: string,
    private readonly log: Logger,
    private readonly clock: () => number = Date.now,
  ) {}

  /** The entry changed; `fresh` says whether its token may be served. */
  update(entry: UserEntry, fresh: boolean): void {
    if (this.closed) return;
    const file = this.file(entry);
    clearTimeout(file.expiry);
    file.expiry = undefined;
    const state = entry.state;
    if (fresh && state) {
      file.want = { token: state.accessToken, generation: state.generation };
      const want = file.want;
      // The entry's own skew: a short-lived token's is smaller than the configured one.
      const stopAt = state.expiresAtMs - entry.skewMs;
      file.expiry = setTimeout(
        () => {
          if (file.want !== want) return;
          file.want = null;
          this.flush(file);
        },
        Math.min(Math.max(0, stopAt - this.clock()), 2 ** 31 - 1),
      );
      file.expiry.unref();
    } else {
      file.want = null;
    }
    this.flush(file);
  }

  /** Stops and removes every file: nobody keeps them fresh after this. */
  async close(): Promise<void> {
    this.closed = true;
    for (const file of this.files.values()) clearTimeout(file.expiry);
    await Promise.all(
      [...this.files.values()].map(async (f) => {
        await f.running;
        await rm(f.path, { force: true }).catch(() => undefined);
      }),
    );
  }

  private file(entry: UserEntry): FileState {
    let file = this.files.get(entry.key);
    if (!file) {
      const dirName = tokenFileName(entry.tenant);
      const fileName = tokenFileName(entry.user);
      const dir = join(this.root, dirName);
      file = {
        tenant: entry.tenant,
        user: entry.user,
        dir,
        path: join(dir, fileName),
        want: null,
        done: null,
        running: undefined,
        expiry: undefined,
      };
      this.files.set(entry.key, file);
      if (dirName !== entry.tenant || fileName !== entry.user)
        this.log.info(
          { tenant: entry.tenant, user: entry.user, file: file.path },
          `token file under a hashed name: a name longer than ${NAME_MAX} bytes is not a file name`,
        );
    }
    return file;
  }

  /** One write at a time per file, always of the newest wanted content. */
  private flush(file: FileState): void {
    if (file.running || this.closed || file.want === file.done) return;
    file.running = this.drain(file).then((ok) => {
      file.running = undefined;
      // A change that arrived as the drain ended; a failure waits for the next change.
      if (ok) this.flush(file);
    });
  }

  private async drain(file: FileState): Promise<boolean> {
    while (!this.closed && file.want !== file.done) {
      const want = file.want;
      try {
        if (want) await this.write(file, want.token);
        else await rm(file.path, { force: true });
      } catch (err) {
        this.log.warn(
          { tenant: file.tenant, user: file.user, err: (err as Error).message },
          'token file update failed',
        );
        return false;
      }
      file.done = want;
      this.log.debug(
        { tenant: file.tenant, user: file.user, generation: want?.generation },
        want ? 'token file written' : 'token file removed',
      );
    }
    return true;
  }

  private async write(file: FileState, token: string): Promise<void> {
    await mkdir(file.dir, { recursive: true, mode: 0o700 });
    // Not derived from the user: a long user name would make it too long (ENAMETOOLONG).
    const tmp = join(file.dir, `.tb-${randomBytes(8).toString('hex')}.tmp`);
    try {
      await writeFile(tmp, token, { mode: 0o600, flag: 'wx' });
      await rename(tmp, file.path);
    } catch (err) {
      await rm(tmp, { force: true }).catch(() => undefined);
      throw err;
    }
  }
}
