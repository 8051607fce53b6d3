import {
  createServer,
  request as httpRequest,
  type IncomingHttpHeaders,
  type Server,
  type ServerResponse,
} from 'node:http';
import type { AddressInfo } from 'node:net';
import { Duplex } from 'node:stream';
import { inspect } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import {
  IdpInvalidClientError,
  IdpInvalidGrantError,
  IdpProtocolError,
  IdpTransientError,
} from '../../broker/errors.js';
import type { IdpTransport } from '../../broker/idp/idp-http.js';
import { OAuth2Adapter, type OAuth2AdapterOptions } from '../../broker/idp/oauth2-adapter.js';

// Obviously fake tokens; compared with `===` so a failure never prints one.
const SENT_RT = 'rt-FAKE-presented-0001';
const NEW_RT = 'rt-FAKE-rotated-0002';
const NEW_AT = 'at-FAKE-access-0003';
const T0 = Date.UTC(2030, 0, 1, 12, 0, 0);
const frozen = (): number => T0;

interface Seen {
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  form: URLSearchParams;
}
type Script = (seen: Seen, res: ServerResponse) => void;

interface FakeIdp {
  base: string;
  seen: Seen[];
  hits: (path: string) => number;
}

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

/** A real HTTP server on 127.0.0.1:0 whose every answer the test scripts. */
async function fakeIdp(script: Script): Promise<FakeIdp> {
  const seen: Seen[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const entry: Seen = {
        method: req.method ?? '',
        path: req.url ?? '',
        headers: req.headers,
        form: new URLSearchParams(Buffer.concat(chunks).toString('utf8')),
      };
      seen.push(entry);
      script(entry, res);
    });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    base: `http://127.0.0.1:${port}`,
    seen,
    hits: (path) => seen.filter((s) => s.path === path).length,
  };
}

function reply(
  res: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(text);
}

const tokenResponse = {
  access_token: NEW_AT,
  token_type: 'Bearer',
  expires_in: 3600,
  refresh_token: NEW_RT,
};

function adapter(
  overrides: Partial<OAuth2AdapterOptions> & { tokenEndpoint?: string },
): OAuth2Adapter {
  return new OAuth2Adapter({
    name: 'test-idp',
    clientId: 'broker',
    clientSecret: 'a:b+c/d%',
    authMethod: 'client_secret_basic',
    timeoutMs: 2000,
    now: frozen,
    ...overrides,
  });
}

async function caught(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error('expected a rejection');
}

function signal(): AbortSignal {
  return new AbortController().signal;
}

async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

function formDecode(value: string): string {
  return decodeURIComponent(value.replace(/\+/g, ' '));
}

describe('OAuth2Adapter refresh request', () => {
  it('client_secret_basic form-urlencodes id and secret before base64', async () => {
    const idp = await fakeIdp((_seen, res) => reply(res, 200, tokenResponse));
    const clientId = 'broker id:1';
    const clientSecret = 'a:b+c/d% é';
    await adapter({ tokenEndpoint: `${idp.base}/token`, clientId, clientSecret }).refresh(
      SENT_RT,
      signal(),
    );

    const [req] = idp.seen;
    expect(req?.method).toBe('POST');
    expect(req?.path).toBe('/token');
    expect(req?.headers['content-type']).toBe('application/x-www-form-urlencoded');
    expect(req?.headers.accept).toBe('application/json');
    const auth = req?.headers.authorization ?? '';
    expect(auth.startsWith('Basic ')).toBe(true);
    const pair = Buffer.from(auth.slice('Basic '.length), 'base64').toString('utf8');
    expect(pair).toBe('broker+id%3A1:a%3Ab%2Bc%2Fd%25+%C3%A9');
    const colon = pair.indexOf(':');
    expect(formDecode(pair.slice(0, colon))).toBe(clientId);
    expect(formDecode(pair.slice(colon + 1))).toBe(clientSecret);

    expect(req?.form.get('grant_type')).toBe('refresh_token');
    expect(req?.form.get('refresh_token') === SENT_RT).toBe(true);
    expect(req?.form.has('client_id')).toBe(false);
    expect(req?.form.has('client_secret')).toBe(false);
    expect(req?.form.has('scope')).toBe(false);
  });

  it('client_secret_post puts id and secret in the body, with scope', async () => {
    const idp = await fakeIdp((_seen, res) => reply(res, 200, tokenResponse));
    await adapter({
      tokenEndpoint: `${idp.base}/token`,
      authMethod: 'client_secret_post',
      scope: 'openid offline_access',
    }).refresh(SENT_RT, signal());

    const [req] = idp.seen;
    expect(req?.headers.authorization).toBeUndefined();
    expect(req?.form.get('client_id')).toBe('broker');
    expect(req?.form.get('client_secret')).toBe('a:b+c/d%');
    expect(req?.form.get('scope')).toBe('openid offline_access');
    expect(req?.form.get('grant_type')).toBe('refresh_token');
    expect(req?.form.get('refresh_token') === SENT_RT).toBe(true);
  });

  it('none sends only client_id', async () => {
    const idp = await fakeIdp((_seen, res) => reply(res, 200, tokenResponse));
    await adapter({
      tokenEndpoint: `${idp.base}/token`,
      authMethod: 'none',
      clientSecret: undefined,
    }).refresh(SENT_RT, signal());

    const [req] = idp.seen;
    expect(req?.headers.authorization).toBeUndefined();
    expect(req?.form.get('client_id')).toBe('broker');
    expect(req?.form.has('client_secret')).toBe(false);
  });
});

describe('OAuth2Adapter token response', () => {
  it('returns the rotated refresh token and absolute expiries from the frozen clock', async () => {
    const idp = await fakeIdp((_seen, res) =>
      reply(res, 200, { ...tokenResponse, token_type: 'DPoP', refresh_expires_in: 1800 }),
    );
    const set = await adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal());
    expect(set.accessToken === NEW_AT).toBe(true);
    expect(set.refreshToken === NEW_RT).toBe(true);
    expect(set.tokenType).toBe('DPoP');
    expect(set.accessExpiresAt).toBe(T0 + 3_600_000);
    expect(set.refreshExpiresAt).toBe(T0 + 1_800_000);
  });

  it('returns undefined when the IdP keeps the old refresh token; numeric-string expires_in', async () => {
    const idp = await fakeIdp((_seen, res) =>
      reply(res, 200, { access_token: NEW_AT, expires_in: '120' }),
    );
    const set = await adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal());
    expect(set.refreshToken).toBeUndefined();
    expect(set.tokenType).toBe('Bearer');
    expect(set.accessExpiresAt).toBe(T0 + 120_000);
    expect(set.refreshExpiresAt).toBeUndefined();
  });

  it('assumes 300 s without expires_in; refresh_expires_in 0 (Keycloak offline) means no expiry', async () => {
    const idp = await fakeIdp((_seen, res) =>
      reply(res, 200, { access_token: NEW_AT, refresh_token: NEW_RT, refresh_expires_in: 0 }),
    );
    const set = await adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal());
    expect(set.accessExpiresAt).toBe(T0 + 300_000);
    expect(set.refreshExpiresAt).toBeUndefined();
  });

  it('without refresh_expires_in, the exp of a JWT refresh token is when the family ends', async () => {
    const b64url = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const exp = Math.floor(T0 / 1000) + 7_200;
    const jwtRt = `${b64url({ alg: 'HS256' })}.${b64url({ exp, typ: 'Refresh' })}.c2ln`;
    const answers = [
      { access_token: NEW_AT, refresh_token: jwtRt },
      // refresh_expires_in wins over the JWT (Keycloak sends both, and they agree).
      { access_token: NEW_AT, refresh_token: jwtRt, refresh_expires_in: 60 },
      { access_token: NEW_AT, refresh_token: NEW_RT },
    ];
    const idp = await fakeIdp((_seen, res) => reply(res, 200, answers.shift()!));
    const broker = adapter({ tokenEndpoint: `${idp.base}/token` });
    expect((await broker.refresh(SENT_RT, signal())).refreshExpiresAt).toBe(exp * 1000);
    expect((await broker.refresh(SENT_RT, signal())).refreshExpiresAt).toBe(T0 + 60_000);
    // Opaque and no refresh_expires_in: unknown.
    expect((await broker.refresh(SENT_RT, signal())).refreshExpiresAt).toBeUndefined();
  });

  it('reads the clock before sending, not after the answer', async () => {
    let clock = T0;
    const idp = await fakeIdp((_seen, res) => {
      clock += 60_000;
      reply(res, 200, { ...tokenResponse, refresh_expires_in: 600 });
    });
    const set = await adapter({ tokenEndpoint: `${idp.base}/token`, now: () => clock }).refresh(
      SENT_RT,
      signal(),
    );
    expect(clock).toBe(T0 + 60_000);
    expect(set.accessExpiresAt).toBe(T0 + 3_600_000);
    expect(set.refreshExpiresAt).toBe(T0 + 600_000);
  });
});

describe('OAuth2Adapter failure classes', () => {
  it('invalid_grant is terminal; the description reaches detail truncated to 200 chars', async () => {
    const idp = await fakeIdp((_seen, res) =>
      reply(res, 400, {
        error: 'invalid_grant',
        error_description: `Token is not active ${'x'.repeat(500)}`,
      }),
    );
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(IdpInvalidGrantError);
    const { message, detail } = err as IdpInvalidGrantError;
    expect(message).toContain('HTTP 400');
    expect(message).toContain(`${idp.base}/token`);
    expect(message).toContain('invalid_grant');
    expect(detail).toContain('Token is not active');
    expect(detail!.length).toBeLessThanOrEqual('error_description: '.length + 201);
  });

  it.each([
    [401, { error: 'invalid_client' }, IdpInvalidClientError],
    [400, { error: 'invalid_client' }, IdpInvalidClientError],
    [400, { error: 'unauthorized_client' }, IdpInvalidClientError],
    [400, { error: 'unsupported_grant_type' }, IdpInvalidClientError],
    [400, { error: 'invalid_scope' }, IdpInvalidClientError],
    [401, '', IdpInvalidClientError],
    [400, { error: 'invalid_request' }, IdpProtocolError],
    [400, { error: 'made_up_error' }, IdpProtocolError],
    [400, 'not json', IdpProtocolError],
    [404, { error: 'not_found' }, IdpProtocolError],
    [403, '<html>forbidden</html>', IdpProtocolError],
  ])('HTTP %i %j → %o', async (status, body, expected) => {
    const idp = await fakeIdp((_seen, res) => reply(res, status, body));
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(expected);
    expect((err as Error).message).toContain(`HTTP ${status}`);
  });

  it('5xx, 429 and 408 are transient and presented, with Retry-After in seconds or as an HTTP-date', async () => {
    const cases: [number, Record<string, string>, number | undefined][] = [
      [500, {}, undefined],
      [503, { 'retry-after': '7' }, 7000],
      [429, { 'retry-after': new Date(T0 + 120_000).toUTCString() }, 120_000],
      [503, { 'retry-after': new Date(T0 - 5000).toUTCString() }, 0],
      [408, { 'retry-after': 'soon' }, undefined],
      [502, {}, undefined],
    ];
    for (const [status, headers, retryAfterMs] of cases) {
      const idp = await fakeIdp((_seen, res) =>
        reply(res, status, { error: 'server_error' }, headers),
      );
      const err = await caught(
        adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
      );
      expect(err).toBeInstanceOf(IdpTransientError);
      const transient = err as IdpTransientError;
      expect(transient.presented).toBe(true);
      // An HTTP answer is a known outcome: the IdP did not consume the token.
      expect(transient.answered).toBe(true);
      expect(transient.outcomeUnknown).toBe(false);
      expect(transient.retryAfterMs).toBe(retryAfterMs);
      expect(transient.message).toContain(`HTTP ${status}`);
    }
  });

  it('waits past timeoutMs for the answer to a sent request (up to answerWaitMs)', async () => {
    const idp = await fakeIdp((_seen, res) => {
      setTimeout(() => reply(res, 200, tokenResponse), 400);
    });
    const started = performance.now();
    const tokens = await adapter({
      tokenEndpoint: `${idp.base}/token`,
      timeoutMs: 150,
      answerWaitMs: 5_000,
    }).refresh(SENT_RT, signal());
    expect(performance.now() - started).toBeGreaterThanOrEqual(380);
    expect(tokens.refreshToken === NEW_RT).toBe(true);
    expect(idp.seen).toHaveLength(1);
  });

  it('a request never handed to the connection within timeoutMs is aborted, not presented', async () => {
    // A connection that never connects, as when connecting hangs: the real request machinery
    // writes into it, but it never says connected.
    const hanging: IdpTransport = {
      request: (url, options) =>
        httpRequest(url, {
          ...options,
          createConnection: () => new Duplex({ read() {}, write() {} }),
        }),
    };
    const started = performance.now();
    const err = await caught(
      adapter({
        tokenEndpoint: 'http://127.0.0.1:9/token',
        timeoutMs: 150,
        answerWaitMs: 5_000,
        transport: hanging,
      }).refresh(SENT_RT, signal()),
    );
    expect(performance.now() - started).toBeLessThan(2_000);
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(false);
    expect((err as IdpTransientError).outcomeUnknown).toBe(false);
    expect((err as IdpTransientError).message).toContain('within 150 ms');
  });

  it('a sent request that gets no answer is transient and presented, after about answerWaitMs', async () => {
    const idp = await fakeIdp(() => {
      /* never answers */
    });
    const started = performance.now();
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token`, timeoutMs: 100, answerWaitMs: 300 }).refresh(
        SENT_RT,
        signal(),
      ),
    );
    const elapsed = performance.now() - started;
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(true);
    expect((err as IdpTransientError).message).toContain('300 ms');
    expect(elapsed).toBeGreaterThanOrEqual(280);
    expect(elapsed).toBeLessThan(1500);
  });

  it('connection refused is transient and not presented', async () => {
    const port = await closedPort();
    const err = await caught(
      adapter({ tokenEndpoint: `http://127.0.0.1:${port}/token` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(false);
    expect((err as IdpTransientError).message).toContain('ECONNREFUSED');
  });

  it('a connection dropped mid-request is transient and presented', async () => {
    const idp = await fakeIdp((_seen, res) => res.socket?.destroy());
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(true);
    expect((err as IdpTransientError).outcomeUnknown).toBe(true);
  });

  it('a caller abort in flight is transient, presented, and says aborted', async () => {
    const controller = new AbortController();
    const idp = await fakeIdp(() => controller.abort());
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, controller.signal),
    );
    expect(idp.seen).toHaveLength(1);
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(true);
    expect((err as IdpTransientError).message).toContain('aborted');
  });

  it('an already aborted signal sends nothing and is not presented', async () => {
    const idp = await fakeIdp((_seen, res) => reply(res, 200, tokenResponse));
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, AbortSignal.abort()),
    );
    expect(idp.seen).toHaveLength(0);
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(false);
  });

  it.each([
    ['malformed JSON', '{"access_token":'],
    ['a JSON array', '[]'],
    ['no access_token', { token_type: 'Bearer', expires_in: 60 }],
    ['a non-numeric expires_in', { access_token: NEW_AT, expires_in: 'soon' }],
    ['a negative expires_in', { access_token: NEW_AT, expires_in: -1 }],
    ['an empty refresh_token', { access_token: NEW_AT, refresh_token: '' }],
  ])('HTTP 200 with %s is a protocol error', async (_what, body) => {
    const idp = await fakeIdp((_seen, res) => reply(res, 200, body));
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(IdpProtocolError);
    expect((err as Error).message).toContain('HTTP 200');
  });

  it('an error reported with status 200 is classified by its code', async () => {
    const idp = await fakeIdp((_seen, res) => reply(res, 200, { error: 'invalid_grant' }));
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(IdpInvalidGrantError);
  });

  it('does not follow a redirect with the token', async () => {
    const idp = await fakeIdp((seen, res) => {
      if (seen.path === '/token') res.writeHead(307, { location: '/elsewhere' }).end();
      else reply(res, 200, tokenResponse);
    });
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(IdpProtocolError);
    expect(idp.hits('/elsewhere')).toBe(0);
  });

  it('names the endpoint without its query string', async () => {
    const idp = await fakeIdp((_seen, res) => reply(res, 400, { error: 'invalid_grant' }));
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token?tenant=a&key=hush` }).refresh(SENT_RT, signal()),
    );
    expect((err as Error).message).toContain(`${idp.base}/token answered`);
    expect((err as Error).message).not.toContain('hush');
  });
});

describe('OAuth2Adapter never leaks tokens into errors', () => {
  const leaky = { access_token: NEW_AT, refresh_token: NEW_RT, id_token: NEW_AT };
  const answers: [string, number, unknown, Record<string, string>?][] = [
    [
      'invalid_grant echoing the token',
      400,
      { error: 'invalid_grant', error_description: `bad token ${SENT_RT}` },
    ],
    ['invalid_client', 401, { error: 'invalid_client', ...leaky }],
    ['unknown code holding the token', 400, { error: `bad_${SENT_RT}`, ...leaky }],
    ['invalid_request', 400, { error: 'invalid_request', ...leaky }],
    ['500', 500, leaky],
    ['503', 503, leaky, { 'retry-after': '3' }],
    ['429', 429, leaky],
    ['malformed JSON', 200, `{"access_token":"${NEW_AT}","refresh_token":"${NEW_RT}"`],
    ['missing access_token', 200, { refresh_token: NEW_RT, expires_in: 60 }],
    ['bad expires_in', 200, { ...leaky, expires_in: 'soon' }],
    ['200 with error', 200, { error: `odd ${SENT_RT}`, refresh_token: NEW_RT }],
    ['redirect', 302, leaky, { location: `/x?refresh_token=${SENT_RT}` }],
  ];

  function expectClean(err: unknown): void {
    expect(err).toBeInstanceOf(Error);
    const e = err as Error & { detail?: string };
    // inspect() is what a logger prints: it walks the cause chain too.
    const surfaces = [
      String(err),
      e.message,
      e.detail ?? '',
      JSON.stringify(err),
      inspect(err, { depth: 10 }),
    ];
    for (const token of [SENT_RT, NEW_RT, NEW_AT]) {
      const leaked = surfaces.some((text) => text.includes(token));
      expect(leaked, `a token appeared in ${e.name}: check message, detail and cause`).toBe(false);
    }
  }

  it.each(answers)('refresh: %s', async (_what, status, body, headers) => {
    const idp = await fakeIdp((_seen, res) => reply(res, status, body, headers));
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expectClean(err);
  });

  it.each(answers.filter(([, status]) => status !== 200))(
    'revoke: %s',
    async (_what, status, body, headers) => {
      const idp = await fakeIdp((_seen, res) => reply(res, status, body, headers));
      const err = await caught(
        adapter({
          tokenEndpoint: `${idp.base}/token`,
          revocationEndpoint: `${idp.base}/revoke`,
        }).revoke(SENT_RT, signal()),
      );
      expectClean(err);
    },
  );

  it('timeout, caller abort and connection refused', async () => {
    const hanging = await fakeIdp(() => {
      /* never answers */
    });
    expectClean(
      await caught(
        adapter({
          tokenEndpoint: `${hanging.base}/token`,
          timeoutMs: 100,
          answerWaitMs: 150,
        }).refresh(SENT_RT, signal()),
      ),
    );
    const controller = new AbortController();
    const aborting = await fakeIdp(() => controller.abort());
    expectClean(
      await caught(
        adapter({ tokenEndpoint: `${aborting.base}/token` }).refresh(SENT_RT, controller.signal),
      ),
    );
    const port = await closedPort();
    expectClean(
      await caught(
        adapter({ tokenEndpoint: `http://127.0.0.1:${port}/t` }).refresh(SENT_RT, signal()),
      ),
    );
  });

  it('error_description is masked where it echoes the sent token', async () => {
    const idp = await fakeIdp((_seen, res) =>
      reply(res, 400, { error: 'invalid_grant', error_description: `bad token ${SENT_RT}` }),
    );
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).refresh(SENT_RT, signal()),
    );
    expect((err as IdpInvalidGrantError).detail).toBe('error_description: bad token [redacted]');
  });
});

describe('OAuth2Adapter discovery', () => {
  async function discoverable(
    document: (base: string) => Record<string, unknown>,
  ): Promise<FakeIdp> {
    const idp: FakeIdp = await fakeIdp((seen, res) => {
      if (seen.path === '/realms/demo/.well-known/openid-configuration') {
        reply(res, 200, document(idp.base));
      } else if (seen.path === '/realms/demo/protocol/token') {
        reply(res, 200, tokenResponse);
      } else if (seen.path === '/realms/demo/protocol/revoke') {
        reply(res, 200, '');
      } else {
        reply(res, 404, {});
      }
    });
    return idp;
  }
  const fullDocument = (base: string): Record<string, unknown> => ({
    issuer: `${base}/realms/demo`,
    token_endpoint: `${base}/realms/demo/protocol/token`,
    revocation_endpoint: `${base}/realms/demo/protocol/revoke`,
  });

  it('finds the token and revocation endpoints and fetches the document once', async () => {
    const idp = await discoverable(fullDocument);
    const broker = adapter({ issuer: `${idp.base}/realms/demo/` });
    await Promise.all([broker.refresh(SENT_RT, signal()), broker.refresh(SENT_RT, signal())]);
    await broker.refresh(SENT_RT, signal());
    expect(await broker.revoke(SENT_RT, signal())).toEqual({ revoked: true });
    expect(await broker.revocationProblem(signal())).toBeUndefined();

    expect(idp.hits('/realms/demo/.well-known/openid-configuration')).toBe(1);
    expect(idp.hits('/realms/demo/protocol/token')).toBe(3);
    const revoke = idp.seen.find((s) => s.path === '/realms/demo/protocol/revoke');
    expect(revoke?.form.get('token') === SENT_RT).toBe(true);
    expect(revoke?.form.get('token_type_hint')).toBe('refresh_token');
  });

  it('a failed discovery is transient, not presented, and retried on the next call', async () => {
    let failures = 1;
    const idp: FakeIdp = await fakeIdp((seen, res) => {
      if (seen.path.endsWith('/.well-known/openid-configuration')) {
        if (failures-- > 0) reply(res, 503, {}, { 'retry-after': '2' });
        else reply(res, 200, fullDocument(idp.base));
      } else {
        reply(res, 200, tokenResponse);
      }
    });
    const broker = adapter({ issuer: `${idp.base}/realms/demo` });
    const err = await caught(broker.refresh(SENT_RT, signal()));
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(false);
    expect((err as IdpTransientError).retryAfterMs).toBe(2000);
    expect(idp.hits('/realms/demo/protocol/token')).toBe(0);

    const set = await broker.refresh(SENT_RT, signal());
    expect(set.refreshToken === NEW_RT).toBe(true);
    expect(idp.hits('/realms/demo/.well-known/openid-configuration')).toBe(2);
  });

  it('a caller abort during discovery sends no token', async () => {
    const controller = new AbortController();
    const idp = await fakeIdp(() => controller.abort());
    const err = await caught(
      adapter({ issuer: `${idp.base}/realms/demo` }).refresh(SENT_RT, controller.signal),
    );
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).presented).toBe(false);
    expect((err as IdpTransientError).message).toContain('aborted during discovery');
    expect(idp.seen.map((s) => s.path)).toEqual(['/realms/demo/.well-known/openid-configuration']);
  });

  it('a document without token_endpoint fails discovery', async () => {
    const idp = await discoverable((base) => ({ issuer: `${base}/realms/demo` }));
    const err = await caught(
      adapter({ issuer: `${idp.base}/realms/demo` }).refresh(SENT_RT, signal()),
    );
    expect(err).toBeInstanceOf(IdpTransientError);
    expect((err as IdpTransientError).message).toContain('token_endpoint');
  });

  it('revoke sends nothing and says so when discovery lists no revocation_endpoint', async () => {
    const idp = await discoverable((base) => ({
      token_endpoint: `${base}/realms/demo/protocol/token`,
    }));
    const broker = adapter({ issuer: `${idp.base}/realms/demo` });
    expect(await broker.revoke(SENT_RT, signal())).toEqual({
      revoked: false,
      reason: 'no revocation endpoint',
    });
    expect(await broker.revocationProblem(signal())).toMatch(
      /^no revocation endpoint \(neither TB_IDP_REVOCATION_ENDPOINT nor revocation_endpoint in the discovery document\)$/,
    );
    expect(idp.seen.map((s) => s.path)).toEqual(['/realms/demo/.well-known/openid-configuration']);
  });

  it('without issuer or revocation endpoint there is nowhere to revoke, and nothing is sent', async () => {
    const idp = await discoverable(fullDocument);
    const broker = adapter({ tokenEndpoint: `${idp.base}/realms/demo/protocol/token` });
    expect(await broker.revoke(SENT_RT, signal())).toEqual({
      revoked: false,
      reason: 'no revocation endpoint',
    });
    expect(await broker.revocationProblem(signal())).toContain('no issuer is set');
    expect(idp.seen).toEqual([]);
  });

  it('an explicit tokenEndpoint wins over discovery', async () => {
    const idp = await discoverable(fullDocument);
    await adapter({
      issuer: `${idp.base}/realms/demo`,
      tokenEndpoint: `${idp.base}/realms/demo/protocol/token`,
    }).refresh(SENT_RT, signal());
    expect(idp.hits('/realms/demo/.well-known/openid-configuration')).toBe(0);
  });
});

describe('OAuth2Adapter revoke', () => {
  it('posts token and hint with the same client authentication', async () => {
    const idp = await fakeIdp((_seen, res) => reply(res, 200, ''));
    await adapter({
      tokenEndpoint: `${idp.base}/token`,
      revocationEndpoint: `${idp.base}/revoke`,
      authMethod: 'client_secret_post',
    }).revoke(SENT_RT, signal());
    const [req] = idp.seen;
    expect(req?.path).toBe('/revoke');
    expect(req?.form.get('token') === SENT_RT).toBe(true);
    expect(req?.form.get('token_type_hint')).toBe('refresh_token');
    expect(req?.form.get('client_id')).toBe('broker');
    expect(req?.form.get('client_secret')).toBe('a:b+c/d%');
  });

  it('503 is transient, invalid_client is a client error, others are protocol errors', async () => {
    const cases: [number, unknown, new (...args: never[]) => Error][] = [
      [503, '', IdpTransientError],
      [401, { error: 'invalid_client' }, IdpInvalidClientError],
      [400, { error: 'unsupported_token_type' }, IdpProtocolError],
      [400, { error: 'invalid_grant' }, IdpProtocolError],
      [404, '', IdpProtocolError],
    ];
    for (const [status, body, expected] of cases) {
      const idp = await fakeIdp((_seen, res) => reply(res, status, body, { 'retry-after': '4' }));
      const err = await caught(
        adapter({
          tokenEndpoint: `${idp.base}/token`,
          revocationEndpoint: `${idp.base}/revoke`,
        }).revoke(SENT_RT, signal()),
      );
      expect(err).toBeInstanceOf(expected);
      if (err instanceof IdpTransientError) expect(err.retryAfterMs).toBe(4000);
    }
  });

  it('without a revocation endpoint resolves without any network access', async () => {
    const noNetwork: IdpTransport = {
      request: () => {
        throw new Error('no network access expected');
      },
    };
    await adapter({ tokenEndpoint: 'https://idp.example/token', transport: noNetwork }).revoke(
      SENT_RT,
      signal(),
    );
  });
});

describe('OAuth2Adapter token exchange (RFC 8693)', () => {
  const SUBJECT = 'at-FAKE-subject-0004';

  it('posts the token-exchange grant with the subject token and the configured requested type', async () => {
    const idp = await fakeIdp((_seen, res) =>
      reply(res, 200, {
        ...tokenResponse,
        issued_token_type: 'urn:ietf:params:oauth:token-type:refresh_token',
      }),
    );
    const set = await adapter({ tokenEndpoint: `${idp.base}/token`, scope: 'openid' }).exchange(
      { token: SUBJECT, tokenType: '' },
      signal(),
    );
    const form = idp.seen[0]!.form;
    expect(form.get('grant_type')).toBe('urn:ietf:params:oauth:grant-type:token-exchange');
    expect(form.get('subject_token') === SUBJECT).toBe(true);
    expect(form.get('subject_token_type')).toBe('urn:ietf:params:oauth:token-type:access_token');
    expect(form.get('requested_token_type')).toBe('urn:ietf:params:oauth:token-type:refresh_token');
    expect(form.get('scope')).toBe('openid');
    expect(set.refreshToken === NEW_RT).toBe(true);
    expect(set.accessExpiresAt).toBe(T0 + 3_600_000);
  });

  it('refuses an answer without a refresh token: the broker could not keep the session', async () => {
    const { refresh_token: _rt, ...withoutRt } = tokenResponse;
    const idp = await fakeIdp((_seen, res) => reply(res, 200, withoutRt));
    const err = await caught(
      adapter({
        tokenEndpoint: `${idp.base}/token`,
        exchangeTokenType: 'urn:ietf:params:oauth:token-type:access_token',
      }).exchange({ token: SUBJECT, tokenType: '' }, signal()),
    );
    expect(err).toBeInstanceOf(IdpProtocolError);
    expect(idp.seen[0]!.form.get('requested_token_type')).toBe(
      'urn:ietf:params:oauth:token-type:access_token',
    );
  });

  it('a rejected subject token is invalid_grant, masked in the detail', async () => {
    const idp = await fakeIdp((_seen, res) =>
      reply(res, 400, { error: 'invalid_grant', error_description: `bad ${SUBJECT}` }),
    );
    const err = await caught(
      adapter({ tokenEndpoint: `${idp.base}/token` }).exchange(
        { token: SUBJECT, tokenType: '' },
        signal(),
      ),
    );
    expect(err).toBeInstanceOf(IdpInvalidGrantError);
    expect((err as IdpInvalidGrantError).detail).toBe('error_description: bad [redacted]');
  });
});
