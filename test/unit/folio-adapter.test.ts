import {
  createServer,
  type IncomingHttpHeaders,
  type Server,
  type ServerResponse,
} from 'node:http';
import type { AddressInfo } from 'node:net';
import { inspect } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';

import {
  IdpInvalidGrantError,
  IdpLoginRejectedError,
  IdpProtocolError,
  IdpTransientError,
} from '../../broker/errors.js';
import { FolioAdapter, parseSetCookie } from '../../broker/idp/folio-adapter.js';

/*
 * The two Set-Cookie headers of a login response, verbatim from FOLIO's "Refresh Token Rotation"
 * guide (the guide prints both on one line). Their tokens expired in 2023; compared with `===`.
 */
const GUIDE_AT =
  'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0aW5nX2FkbWluIiwidXNlcl9pZCI6IjczZjgxYTFlLTk0ZGMtNDk3NS1hYjdlLTM3YWM0NGUwNmIyYiIsInR5cGUiOiJhY2Nlc3MiLCJleHAiOjE2OTUzOTMwMTAsImlhdCI6MTY5NTM5MjQxMCwidGVuYW50IjoidGVzdGxpYjE0In0.PqMCOD9ghOPQE7kzD1hYd09otNgOU0T4C1oMHkpn2no';
const GUIDE_RT =
  'eyJlbmMiOiJBMjU2R0NNIiwiYWxnIjoiZGlyIn0..hA3f_Sa2xV7Vo7Np.j9P0oTsggs0r48kMNa5f-M8JrRRAdXx0hYJZp4ecLfNFHA8ee2WtZZQ_P9EGgktqokHOIfVsxQewLbXF04-O2xtlc6i8tCxii3Hv8wT8HmYqcWKAZ6g3UYXS81QS3fYdGsH6DTV_c8hU77knHKGZo3YLbNv5-Qs7en7EhzCEyo79x7hQFfVUrgY7YbKixKkVkRvshTt_nSD2S0T44-H-KC-vmKvn7yLu9W-pCCU4E37NFjBWV9vjK6NiOOa_H-9ZfFo1pDoMTpfrc1KX824LVRAAmvVjLxMQYDtOVZPTSdIO888.v6Pe4Wm-kOPEjmJaiZ32kQ';
const GUIDE_AT_COOKIE = `folioAccessToken=${GUIDE_AT}; Max-Age=600; Expires=Fri, 22 Sep 2023 14:30:10 GMT; Path=/; Secure; HTTPOnly; SameSite=None`;
const GUIDE_RT_COOKIE = `folioRefreshToken=${GUIDE_RT}; Max-Age=604800; Expires=Fri, 29 Sep 2023 14:20:10 GMT; Path=/authn; Secure; HTTPOnly; SameSite=None`;
/** mod-login's RAML example: SameSite=Strict (LOGIN_COOKIE_SAMESITE). */
const RAML_RT_COOKIE =
  'folioRefreshToken=rst.uvw.xyz; Max-Age=604800; Expires=Tue, 30 Jan 2024 15:05:49 GMT; Path=/authn; Secure; HTTPOnly; SameSite=Strict';

const SENT_RT = 'rt-FAKE-presented.0001';
const PASSWORD = 'pw-FAKE-Hunter2-0005';
/** The guide's login happened at 14:20:10 GMT (its RT expires 7 days later). */
const T0 = Date.UTC(2023, 8, 22, 14, 20, 10);
const CONTEXT = { tenant: 'testlib14', user: 'testing_admin' };
const GUIDE_BODY = {
  accessTokenExpiration: '2023-09-22T14:30:10Z',
  refreshTokenExpiration: '2023-09-29T14:20:10Z',
};

interface Seen {
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  body: string;
}
type Script = (seen: Seen, res: ServerResponse) => void;

const servers: Server[] = [];
afterEach(async () => {
  await Promise.all(
    servers.splice(0).map(
      (server) =>
        new Promise<void>((resolve) => {
          server.closeAllConnections();
          server.close(() => resolve());
        }),
    ),
  );
});

/** A real HTTP gateway on 127.0.0.1:0 whose every answer the test scripts. */
async function fakeGateway(script: Script): Promise<{ base: string; seen: Seen[] }> {
  const seen: Seen[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const entry: Seen = {
        method: req.method ?? '',
        path: req.url ?? '',
        headers: req.headers,
        body: Buffer.concat(chunks).toString('utf8'),
      };
      seen.push(entry);
      script(entry, res);
    });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { base: `http://127.0.0.1:${port}`, seen };
}

function answer(
  res: ServerResponse,
  status: number,
  body: unknown,
  cookies: string[] = [],
  headers: Record<string, string> = {},
): void {
  if (cookies.length > 0) res.setHeader('set-cookie', cookies);
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(typeof body === 'string' ? body : JSON.stringify(body));
}

const guideAnswer: Script = (_seen, res) =>
  answer(res, 201, GUIDE_BODY, [GUIDE_AT_COOKIE, GUIDE_RT_COOKIE]);

function adapter(base: string, timeoutMs = 2_000, answerWaitMs?: number): FolioAdapter {
  return new FolioAdapter({ name: 'folio', baseUrl: base, timeoutMs, answerWaitMs, now: () => T0 });
}

async function caught(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

const signal = (): AbortSignal => new AbortController().signal;

/** Message, detail and the whole inspected error (cause chain included) hold none of `secrets`. */
function expectNoSecrets(err: Error, secrets: readonly string[]): void {
  const text = `${err.message}\n${(err as { detail?: string }).detail ?? ''}\n${inspect(err, { depth: 5 })}`;
  const leaked = secrets.some((secret) => text.includes(secret));
  expect(leaked, `a secret appeared in ${err.name}`).toBe(false);
}

describe('FOLIO Set-Cookie parsing (fixtures from the RTR guide)', () => {
  it('reads the access-token cookie: value, Max-Age, Expires, Path=/, Secure, HTTPOnly, SameSite=None', () => {
    const cookie = parseSetCookie(GUIDE_AT_COOKIE)!;
    expect(cookie.name).toBe('folioAccessToken');
    expect(cookie.value === GUIDE_AT).toBe(true);
    expect(cookie.maxAgeSeconds).toBe(600);
    expect(cookie.expiresAt).toBe(Date.UTC(2023, 8, 22, 14, 30, 10));
    expect(cookie.path).toBe('/');
    expect(cookie.attributes.has('secure')).toBe(true);
    expect(cookie.attributes.has('httponly')).toBe(true);
    expect(cookie.attributes.get('samesite')).toBe('None');
  });

  it('reads the refresh-token cookie with Path=/authn and a 7-day Max-Age', () => {
    const cookie = parseSetCookie(GUIDE_RT_COOKIE)!;
    expect(cookie.name).toBe('folioRefreshToken');
    expect(cookie.value === GUIDE_RT).toBe(true);
    expect(cookie.maxAgeSeconds).toBe(604_800);
    expect(cookie.expiresAt).toBe(Date.UTC(2023, 8, 29, 14, 20, 10));
    expect(cookie.path).toBe('/authn');
    expect(cookie.attributes.get('samesite')).toBe('None');
    expect(parseSetCookie(RAML_RT_COOKIE)!.attributes.get('samesite')).toBe('Strict');
  });

  it('ignores a header without a name=value pair and unquotes a quoted value', () => {
    expect(parseSetCookie('Secure; HttpOnly')).toBeUndefined();
    expect(parseSetCookie('a="b.c"; Path=/')!.value).toBe('b.c');
  });
});

describe('FolioAdapter.refresh', () => {
  it('posts /authn/refresh with the RT cookie and x-okapi-tenant, and reads the new pair from Set-Cookie', async () => {
    const gateway = await fakeGateway(guideAnswer);
    const tokens = await adapter(`${gateway.base}/`).refresh(SENT_RT, signal(), CONTEXT);
    const [seen] = gateway.seen;
    expect(seen!.method).toBe('POST');
    expect(seen!.path).toBe('/authn/refresh');
    expect(seen!.headers.cookie === `folioRefreshToken=${SENT_RT}`).toBe(true);
    expect(seen!.headers['x-okapi-tenant']).toBe('testlib14');
    expect(seen!.body).toBe('');
    expect(tokens.accessToken === GUIDE_AT).toBe(true);
    expect(tokens.refreshToken === GUIDE_RT).toBe(true);
    expect(tokens.tokenType).toBe('Bearer');
    expect(tokens.accessExpiresAt).toBe(Date.parse(GUIDE_BODY.accessTokenExpiration));
    expect(tokens.refreshExpiresAt).toBe(Date.parse(GUIDE_BODY.refreshTokenExpiration));
  });

  it('takes expiries from the body first: they win over the cookies', async () => {
    const body = { accessTokenExpiration: '2023-09-22T14:23:10.500Z' };
    const gateway = await fakeGateway((_s, res) =>
      answer(res, 201, body, [GUIDE_AT_COOKIE, GUIDE_RT_COOKIE]),
    );
    const tokens = await adapter(gateway.base).refresh(SENT_RT, signal(), CONTEXT);
    expect(tokens.accessExpiresAt).toBe(Date.parse(body.accessTokenExpiration));
    // No refreshTokenExpiration in the body: the cookie's Max-Age counts from the request.
    expect(tokens.refreshExpiresAt).toBe(T0 + 604_800_000);
  });

  it('falls back to Max-Age (from when the request was sent), then to Expires', async () => {
    const gateway = await fakeGateway((_s, res) =>
      answer(res, 201, '', [GUIDE_AT_COOKIE, GUIDE_RT_COOKIE.replace(/Max-Age=\d+; /, '')]),
    );
    const tokens = await adapter(gateway.base).refresh(SENT_RT, signal(), CONTEXT);
    expect(tokens.accessExpiresAt).toBe(T0 + 600_000);
    expect(tokens.refreshExpiresAt).toBe(Date.UTC(2023, 8, 29, 14, 20, 10));
  });

  it("reads mod-users-bl's nested tokenExpiration too", async () => {
    const gateway = await fakeGateway((_s, res) =>
      answer(res, 201, { user: {}, tokenExpiration: GUIDE_BODY }, [
        GUIDE_AT_COOKIE,
        GUIDE_RT_COOKIE,
      ]),
    );
    const tokens = await adapter(gateway.base).refresh(SENT_RT, signal(), CONTEXT);
    expect(tokens.accessExpiresAt).toBe(Date.parse(GUIDE_BODY.accessTokenExpiration));
  });

  it.each([422, 401, 403])(
    'HTTP %i (invalid, expired or used RT) is terminal invalid_grant, without the token in the error',
    async (status) => {
      const gateway = await fakeGateway((_s, res) =>
        answer(res, status, {
          errors: [{ message: `Invalid token ${SENT_RT}`, code: 'token.invalid' }],
        }),
      );
      const err = await caught(adapter(gateway.base).refresh(SENT_RT, signal(), CONTEXT));
      expect(err).toBeInstanceOf(IdpInvalidGrantError);
      expect(err.message).toContain(`HTTP ${status}`);
      expect((err as IdpInvalidGrantError).detail).toContain('[redacted]');
      expectNoSecrets(err, [SENT_RT]);
    },
  );

  it.each([400, 404])(
    'HTTP %i (no cookie seen, no module) is a protocol error, retried',
    async (status) => {
      const gateway = await fakeGateway((_s, res) => answer(res, status, 'Bad request'));
      const err = await caught(adapter(gateway.base).refresh(SENT_RT, signal(), CONTEXT));
      expect(err).toBeInstanceOf(IdpProtocolError);
    },
  );

  it('gateway 503 with Retry-After is transient and honours it', async () => {
    const gateway = await fakeGateway((_s, res) =>
      answer(res, 503, 'Service Unavailable', [], { 'retry-after': '7' }),
    );
    const err = await caught(adapter(gateway.base).refresh(SENT_RT, signal(), CONTEXT));
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).retryAfterMs).toBe(7_000);
    expect((err as IdpTransientError).presented).toBe(true);
  });

  it('a gateway that does not answer within the answer wait is transient and presented', async () => {
    const gateway = await fakeGateway(() => undefined);
    const err = await caught(adapter(gateway.base, 100, 200).refresh(SENT_RT, signal(), CONTEXT));
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(true);
    expect(err.message).toContain('no answer within 200 ms');
  });

  it('connection refused is transient and surely not presented', async () => {
    const gateway = await fakeGateway(guideAnswer);
    const server = servers.pop()!;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    const err = await caught(adapter(gateway.base).refresh(SENT_RT, signal(), CONTEXT));
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(false);
  });

  it('refuses an answer without the rotated refresh-token cookie (the next refresh would be a reuse)', async () => {
    const noRt = await fakeGateway((_s, res) => answer(res, 201, GUIDE_BODY, [GUIDE_AT_COOKIE]));
    expect(await caught(adapter(noRt.base).refresh(SENT_RT, signal(), CONTEXT))).toBeInstanceOf(
      IdpProtocolError,
    );
    const sameRt = await fakeGateway((_s, res) =>
      answer(res, 201, GUIDE_BODY, [GUIDE_AT_COOKIE, `folioRefreshToken=${SENT_RT}; Path=/authn`]),
    );
    const err = await caught(adapter(sameRt.base).refresh(SENT_RT, signal(), CONTEXT));
    expect(err).toBeInstanceOf(IdpProtocolError);
    expectNoSecrets(err, [SENT_RT]);
  });

  it('sends nothing for a token that is no cookie value or a tenant that is no header value', async () => {
    const gateway = await fakeGateway(guideAnswer);
    const badToken = await caught(adapter(gateway.base).refresh('a; b=c', signal(), CONTEXT));
    expect(badToken).toBeInstanceOf(IdpInvalidGrantError);
    const badTenant = await caught(
      adapter(gateway.base).refresh(SENT_RT, signal(), { tenant: 'dïku', user: 'x' }),
    );
    expect(badTenant).toBeInstanceOf(IdpProtocolError);
    expect(gateway.seen).toHaveLength(0);
  });
});

describe('FolioAdapter.login', () => {
  it('posts /authn/login-with-expiry {username, password} with the tenant, and reads the pair', async () => {
    const gateway = await fakeGateway(guideAnswer);
    const tokens = await adapter(gateway.base).login(
      { username: 'testing_admin', password: PASSWORD },
      signal(),
      CONTEXT,
    );
    const [seen] = gateway.seen;
    expect(seen!.path).toBe('/authn/login-with-expiry');
    expect(seen!.headers['content-type']).toBe('application/json');
    expect(seen!.headers['x-okapi-tenant']).toBe('testlib14');
    expect(seen!.headers.cookie).toBeUndefined();
    const body = JSON.parse(seen!.body) as { username: string; password: string };
    expect(body.username).toBe('testing_admin');
    expect(body.password === PASSWORD).toBe(true);
    expect(tokens.refreshToken === GUIDE_RT).toBe(true);
  });

  it('a refused login (422 password.incorrect) is IdpLoginRejectedError, never echoing the password', async () => {
    const gateway = await fakeGateway((_s, res) =>
      answer(res, 422, {
        errors: [{ message: `Password ${PASSWORD} does not match`, code: 'password.incorrect' }],
      }),
    );
    const err = await caught(
      adapter(gateway.base).login({ username: 'u', password: PASSWORD }, signal(), CONTEXT),
    );
    expect(err).toBeInstanceOf(IdpLoginRejectedError);
    expect(err.message).toContain('password.incorrect');
    expectNoSecrets(err, [PASSWORD]);
  });

  it('a 5xx during login is transient; a 404 (legacy tenant) is a protocol error', async () => {
    const down = await fakeGateway((_s, res) => answer(res, 502, 'Bad Gateway'));
    expect(
      await caught(
        adapter(down.base).login({ username: 'u', password: PASSWORD }, signal(), CONTEXT),
      ),
    ).toBeInstanceOf(IdpTransientError);
    const legacy = await fakeGateway((_s, res) => answer(res, 404, 'No suitable module found'));
    expect(
      await caught(
        adapter(legacy.base).login({ username: 'u', password: PASSWORD }, signal(), CONTEXT),
      ),
    ).toBeInstanceOf(IdpProtocolError);
  });
});

describe('FolioAdapter.revoke', () => {
  it('posts /authn/logout with the RT cookie; 204 and an already invalid token (422) both succeed', async () => {
    const statuses = [204, 422];
    const gateway = await fakeGateway((_s, res) => answer(res, statuses.shift() ?? 500, ''));
    await adapter(gateway.base).revoke(SENT_RT, signal(), CONTEXT);
    await adapter(gateway.base).revoke(SENT_RT, signal(), CONTEXT);
    expect(gateway.seen.map((s) => s.path)).toEqual(['/authn/logout', '/authn/logout']);
    expect(gateway.seen[0]!.headers.cookie === `folioRefreshToken=${SENT_RT}`).toBe(true);
    expect(gateway.seen[0]!.headers['x-okapi-tenant']).toBe('testlib14');
    const err = await caught(adapter(gateway.base).revoke(SENT_RT, signal(), CONTEXT));
    expect(err).toBeInstanceOf(IdpTransientError);
  });
});
