import { readFile, realpath } from 'node:fs/promises';
import { isAbsolute, relative, resolve, sep } from 'node:path';
import { InvalidArgumentError, LoginSecretError, quotePrefix } from '../errors.js';

/**
 * Password files of system users, confined to one directory (TB_SECRETS_DIR, typically a mounted
 * Kubernetes Secret). A name is relative to the directory and must stay inside it once symlinks
 * are resolved. Files are read at each login, so a rotated password is picked up; contents never
 * reach a message.
 */
export class LoginSecrets {
  constructor(readonly dir: string) {}

  /** Validates a name from a request; `field` is the request field named in the error. */
  async check(name: string, field: string): Promise<void> {
    if (name === '' || isAbsolute(name) || escapes(relative(this.dir, resolve(this.dir, name))))
      throw new InvalidArgumentError(field, 'must be a file name relative to TB_SECRETS_DIR');
    try {
      await this.read(name);
    } catch (err) {
      throw new InvalidArgumentError(field, (err as Error).message);
    }
  }

  async read(name: string): Promise<string> {
    const label = `login password file ${quotePrefix(name)}`;
    let text: string;
    try {
      const [dir, file] = await Promise.all([
        realpath(this.dir),
        realpath(resolve(this.dir, name)),
      ]);
      if (isAbsolute(name) || escapes(relative(dir, file)))
        throw new LoginSecretError(`${label} resolves outside TB_SECRETS_DIR`);
      text = await readFile(file, 'utf8');
    } catch (err) {
      if (err instanceof LoginSecretError) throw err;
      const code = (err as { code?: unknown }).code;
      throw new LoginSecretError(
        `${label} cannot be read${typeof code === 'string' ? ` (${code})` : ''}`,
      );
    }
    // Editors and `kubectl create secret --from-file` often leave one trailing newline.
    const password = text.replace(/\r?\n$/, '');
    if (password === '') throw new LoginSecretError(`${label} is empty`);
    return password;
  }
}

function escapes(path: string): boolean {
  return path === '..' || path.startsWith(`..${sep}`) || isAbsolute(path);
}
