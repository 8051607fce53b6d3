/**
 * An emulator of FOLIO's mod-login refresh-token rotation (behind Okapi), over node:http on
 * 127.0.0.1:PORT, following FOLIO's "Refresh Token Rotation" guide.
 *
 *   const folio = await startFolioEmulator({ tokenExpiration: 'accessToken:3,refreshToken:60' });
 *   folio.addUser('diku', 'diku_admin', 'admin');
 *   const browser = await folio.login('diku', 'diku_admin', 'admin');   // a client of its own
 *   await folio.callProtected('diku', browser.accessToken);              // 200, or 401 once expired
 *   folio.counters.reuses; folio.refreshesInFamilyOf(rt);
 *   await folio.close();
 *
 * Endpoints (every one needs `x-okapi-tenant`):
 *   POST /authn/login-with-expiry {username, password}: 201, a new token family. The AT and RT
 *     travel only in Set-Cookie headers, with FOLIO's attributes: `folioAccessToken=…; Max-Age=…;
 *     Expires=…; Path=/; Secure; HTTPOnly; SameSite=None` and the same for `folioRefreshToken`
 *     with `Path=/authn`. The body is `{accessTokenExpiration, refreshTokenExpiration}` (ISO 8601).
 *     Unknown user or wrong password: 422 `{errors: [{code: 'username.incorrect' | 'password.incorrect'}]}`.
 *   POST /authn/refresh (Cookie folioRefreshToken): 201 with a new pair in the same family. Every
 *     RT is single-use: presenting a used one is a leaked token, and every refresh token of that
 *     user (all families: every device) is revoked. Unknown, expired, revoked or reused: 422.
 *     No RT cookie: 400.
 *   POST /authn/logout (Cookie folioRefreshToken): 204; invalidates that RT only.
 *   POST /authn/logout-all (x-okapi-token): 204; invalidates every RT of the token's user.
 *   ANY /data-import/records (x-okapi-token): a protected module endpoint. 200 while the AT is
 *     signed by the emulator, for this tenant and unexpired; 401 otherwise. ATs are stateless
 *     JWTs as in FOLIO: revoking refresh tokens does not end an AT before its `exp`.
 *
 * TTLs are configured like mod-authtoken's TOKEN_EXPIRATION_SECONDS: `accessToken:600,
 * refreshToken:604800` (the defaults), or per tenant, `tenantId:diku,accessToken:3;...`.
 * A refresh issues an RT with a fresh RT lifetime, as mod-authtoken does (capped at the family's
 * end with `familyMaxSeconds`).
 *
 * Counters (live; resetCounters() zeroes them): logins, loginFailures, refreshRequests, refreshes,
 * refreshRejections, reuses (used RTs presented again), revocations (whole-user revocations:
 * reuse or logout-all), logouts, protectedAccepted, protectedRejected, faultsInjected.
 * setFault() answers the next `times` /authn/* requests with a status (and Retry-After) instead.
 * Token values are never logged; tests compare them with `===` only.
 */
import { createHmac, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { TEST_TIMINGS, withRedis } from '../../scripts/dev/broker-env.js';
import { devIdentity } from '../../scripts/dev/dev-identity.js';

export const PROTECTED_PATH = '/data-import/records';

/**
 * Environment for a broker whose default IdP is this emulator (TB_IDP_TYPE=folio), with the same
 * test-scaled timings as brokerEnv(). `redis` omitted means embedded mode.
 */
export function folioBrokerEnv(
  folio: { url: string },
  redis?: { state: string; locks: readonly string[]; keys: string; prefix: string },
  extra: Record<string, string> = {},
): Record<string, string> {
  const env: Record<string, string> = {
    TB_GRPC_ADDRESS: '127.0.0.1:0',
    TB_IDP_NAME: 'folio',
    TB_IDP_TYPE: 'folio',
    TB_IDP_FOLIO_URL: folio.url,
    // TLS and caller authentication on, as in a cluster (scripts/dev/dev-identity.ts).
    ...devIdentity().brokerEnv(),
    ...TEST_TIMINGS,
    ...extra,
  };
  return withRedis(env, redis);
}

export interface FolioEmulatorOptions {
  /** mod-authtoken's TOKEN_EXPIRATION_SECONDS syntax; default `accessToken:600,refreshToken:604800`. */
  tokenExpiration?: string;
  /** mod-login's LOGIN_COOKIE_SAMESITE; default None, as in the RTR guide's example. */
  sameSite?: 'None' | 'Lax' | 'Strict';
  /**
   * A Keycloak-like session maximum behind the gateway (FOLIO Eureka): every refresh token of a
   * family expires at most this many seconds after its login, whatever its own lifetime, so
   * refreshTokenExpiration counts down to the family's end. Default: none.
   */
  familyMaxSeconds?: number;
}

export interface FolioCounters {
  logins: number;
  loginFailures: number;
  refreshRequests: number;
  refreshes: number;
  refreshRejections: number;
  reuses: number;
  revocations: number;
  logouts: number;
  protectedAccepted: number;
  protectedRejected: number;
  faultsInjected: number;
}

export interface FolioFault {
  status: 500 | 502 | 503 | 504 | 429;
  retryAfterSeconds?: number;
  /** How many /authn/* requests get it; default 1. */
  times?: number;
}

/** What a client of the emulator holds after a login or refresh. */
export interface FolioPair {
  status: number;
  accessToken: string;
  refreshToken: string;
  /** The raw Set-Cookie headers (they hold token values: never print them). */
  setCookies: string[];
  body: Record<string, unknown>;
}

export interface FolioEmulator {
  readonly url: string;
  readonly port: number;
  readonly counters: Readonly<FolioCounters>;
  addUser(tenant: string, username: string, password: string): void;
  setPassword(tenant: string, username: string, password: string): void;
  /** Server-side logout-all: every refresh token of the user is dead from now on. */
  revokeUser(tenant: string, username: string): number;
  /** Successful refreshes in the family `token` (an AT or RT) belongs to. */
  refreshesInFamilyOf(token: string): number;
  /** Families (logins) of a user so far. */
  familiesOf(tenant: string, username: string): number;
  resetCounters(): void;
  setFault(fault: FolioFault | undefined): void;
  /** A client's calls (real HTTP): login, refresh, logout, the protected endpoint. */
  login(tenant: string, username: string, password: string): Promise<FolioPair>;
  refresh(tenant: string, refreshToken: string): Promise<FolioPair | { status: number }>;
  logout(tenant: string, refreshToken: string): Promise<number>;
  callProtected(tenant: string, accessToken: string): Promise<number>;
  /** Closes the listener and open connections: clients get ECONNREFUSED. */
  stopListening(): Promise<void>;
  resumeListening(): Promise<void>;
  close(): Promise<void>;
}

interface Ttl {
  accessToken: number;
  refreshToken: number;
}

interface User {
  id: string;
  tenant: string;
  username: string;
  password: string;
}

interface Family {
  id: string;
  user: User;
  refreshes: number;
  /** Epoch ms of its login. */
  startedAt: number;
}

interface RefreshTokenState {
  family: Family;
  expiresAt: number;
  /** Presented once already (rotated). */
  used: boolean;
  /** Logged out or revoked. */
  revoked: boolean;
}

/** Parses TOKEN_EXPIRATION_SECONDS: `;`-separated entries, each `key:value` pairs by `,`. */
export function parseTokenExpiration(text: string): { global: Ttl; tenants: Map<string, Ttl> } {
  const global: Ttl = { accessToken: 600, refreshToken: 604_800 };
  const tenants = new Map<string, Ttl>();
  for (const entry of text
    .split(';')
    .map((e) => e.trim())
    .filter(Boolean)) {
    const pairs = new Map(
      entry.split(',').map((pair) => {
        const [key = '', value = ''] = pair.split(':').map((p) => p.trim());
        return [key, value] as const;
      }),
    );
    const seconds = (key: string): number | undefined => {
      const value = pairs.get(key);
      if (value === undefined) return undefined;
      if (!/^\d+$/.test(value)) throw new Error(`TOKEN_EXPIRATION_SECONDS: bad ${key} ${value}`);
      return Number(value);
    };
    const tenant = pairs.get('tenantId');
    const base = tenant === undefined ? global : { ...global };
    base.accessToken = seconds('accessToken') ?? base.accessToken;
    base.refreshToken = seconds('refreshToken') ?? base.refreshToken;
    if (tenant !== undefined) tenants.set(tenant, base);
  }
  return { global, tenants };
}

export async function startFolioEmulator(
  options: FolioEmulatorOptions = {},
): Promise<FolioEmulator> {
  const ttls = parseTokenExpiration(options.tokenExpiration ?? '');
  const ttlOf = (tenant: string): Ttl => ttls.tenants.get(tenant) ?? ttls.global;
  const sameSite = options.sameSite ?? 'None';
  const signingKey = randomBytes(32);
  const users = new Map<string, User>();
  const refreshTokens = new Map<string, RefreshTokenState>();
  const familyOfAccess = new Map<string, Family>();
  const familiesByUser = new Map<string, Family[]>();
  const counters = zeroCounters();
  let fault: { fault: FolioFault; left: number } | undefined;
  const userKey = (tenant: string, username: string) => `${tenant}/${username}`;

  const signAccessToken = (user: User, exp: number, iat: number): string => {
    const encode = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');
    const header = encode({ alg: 'HS256' });
    const payload = encode({
      sub: user.username,
      user_id: user.id,
      type: 'access',
      exp,
      iat,
      tenant: user.tenant,
    });
    const signature = createHmac('sha256', signingKey)
      .update(`${header}.${payload}`)
      .digest('base64url');
    return `${header}.${payload}.${signature}`;
  };

  /** The claims of a token this emulator signed, or undefined. */
  const verifyAccessToken = (token: string): { exp: number; tenant: string } | undefined => {
    const [header, payload, signature, extra] = token.split('.');
    if (!header || !payload || !signature || extra !== undefined) return undefined;
    const expected = createHmac('sha256', signingKey).update(`${header}.${payload}`).digest();
    const given = Buffer.from(signature, 'base64url');
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) return undefined;
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString()) as {
      exp: number;
      tenant: string;
    };
    return claims;
  };

  /** A new pair in `family`: the RT looks like FOLIO's (a compact JWE, `dir` + A256GCM). */
  const issuePair = (family: Family, res: ServerResponse): void => {
    const { user } = family;
    const ttl = ttlOf(user.tenant);
    const now = Date.now();
    const iat = Math.floor(now / 1000);
    const accessExp = iat + ttl.accessToken;
    const accessToken = signAccessToken(user, accessExp, iat);
    const jweHeader = Buffer.from('{"enc":"A256GCM","alg":"dir"}').toString('base64url');
    const refreshToken = [
      jweHeader,
      '',
      randomBytes(12).toString('base64url'),
      randomBytes(48).toString('base64url'),
      randomBytes(16).toString('base64url'),
    ].join('.');
    const refreshExpiresAt =
      options.familyMaxSeconds === undefined
        ? now + ttl.refreshToken * 1000
        : Math.min(
            now + ttl.refreshToken * 1000,
            family.startedAt + options.familyMaxSeconds * 1000,
          );
    const refreshMaxAge = Math.max(0, Math.floor((refreshExpiresAt - now) / 1000));
    refreshTokens.set(refreshToken, {
      family,
      expiresAt: refreshExpiresAt,
      used: false,
      revoked: false,
    });
    familyOfAccess.set(accessToken, family);
    const cookie = (name: string, value: string, maxAge: number, path: string): string =>
      `${name}=${value}; Max-Age=${maxAge}; Expires=${new Date(now + maxAge * 1000).toUTCString()}; ` +
      `Path=${path}; Secure; HTTPOnly; SameSite=${sameSite}`;
    res.statusCode = 201;
    res.setHeader('set-cookie', [
      cookie('folioAccessToken', accessToken, ttl.accessToken, '/'),
      cookie('folioRefreshToken', refreshToken, refreshMaxAge, '/authn'),
    ]);
    json(res, 201, {
      accessTokenExpiration: new Date(accessExp * 1000).toISOString(),
      refreshTokenExpiration: new Date(refreshExpiresAt).toISOString(),
    });
  };

  /** Every refresh token of the user dies (all devices). ATs stay valid until `exp`. */
  const revokeAllOf = (user: User): number => {
    let revoked = 0;
    for (const state of refreshTokens.values()) {
      if (state.family.user === user && !state.revoked && !state.used) {
        state.revoked = true;
        revoked++;
      }
    }
    counters.revocations++;
    return revoked;
  };

  const rejectRefresh = (res: ServerResponse, message: string): void => {
    counters.refreshRejections++;
    json(res, 422, { errors: [{ message, type: 'error', code: 'token.invalid' }] });
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://folio.invalid');
    const path = url.pathname;
    const body = await readBody(req);
    const tenant = header(req, 'x-okapi-tenant');
    if (path.startsWith('/authn/') && fault) {
      const current = fault.fault;
      if (--fault.left <= 0) fault = undefined;
      counters.faultsInjected++;
      if (path === '/authn/refresh') counters.refreshRequests++;
      if (current.retryAfterSeconds !== undefined)
        res.setHeader('retry-after', String(current.retryAfterSeconds));
      res.writeHead(current.status, { 'content-type': 'text/plain' });
      res.end('injected fault');
      return;
    }
    if (!tenant) {
      text(res, 400, 'Missing x-okapi-tenant header');
      return;
    }

    if (req.method === 'POST' && path === '/authn/login-with-expiry') {
      let credentials: { username?: unknown; password?: unknown };
      try {
        credentials = JSON.parse(body) as typeof credentials;
      } catch {
        text(res, 400, 'Bad request');
        return;
      }
      const user =
        typeof credentials.username === 'string'
          ? users.get(userKey(tenant, credentials.username))
          : undefined;
      if (!user) {
        counters.loginFailures++;
        json(res, 422, {
          errors: [{ message: 'No user found by username', code: 'username.incorrect' }],
        });
        return;
      }
      if (credentials.password !== user.password) {
        counters.loginFailures++;
        json(res, 422, {
          errors: [{ message: 'Password does not match', code: 'password.incorrect' }],
        });
        return;
      }
      counters.logins++;
      const family: Family = { id: randomUUID(), user, refreshes: 0, startedAt: Date.now() };
      const families = familiesByUser.get(userKey(tenant, user.username)) ?? [];
      families.push(family);
      familiesByUser.set(userKey(tenant, user.username), families);
      issuePair(family, res);
      return;
    }

    if (req.method === 'POST' && path === '/authn/refresh') {
      counters.refreshRequests++;
      const token = refreshCookie(req);
      if (token === undefined) {
        counters.refreshRejections++;
        json(res, 400, 'No refresh token in request');
        return;
      }
      const state = refreshTokens.get(token);
      if (!state || state.family.user.tenant !== tenant) {
        rejectRefresh(res, 'Invalid token');
        return;
      }
      if (state.used) {
        // A leaked token: log the user out everywhere.
        counters.reuses++;
        revokeAllOf(state.family.user);
        rejectRefresh(res, 'Refresh token has already been used');
        return;
      }
      if (state.revoked) {
        rejectRefresh(res, 'Refresh token has been revoked');
        return;
      }
      if (state.expiresAt <= Date.now()) {
        rejectRefresh(res, 'Refresh token has expired');
        return;
      }
      state.used = true;
      state.family.refreshes++;
      counters.refreshes++;
      issuePair(state.family, res);
      return;
    }

    if (req.method === 'POST' && path === '/authn/logout') {
      const token = refreshCookie(req);
      const state = token === undefined ? undefined : refreshTokens.get(token);
      if (!state || state.used || state.revoked || state.family.user.tenant !== tenant) {
        json(res, 422, { errors: [{ message: 'Invalid token', code: 'token.invalid' }] });
        return;
      }
      state.revoked = true;
      counters.logouts++;
      res.writeHead(204).end();
      return;
    }

    if (req.method === 'POST' && path === '/authn/logout-all') {
      const family = familyOfAccess.get(header(req, 'x-okapi-token') ?? '');
      if (!family) {
        text(res, 401, 'Invalid token');
        return;
      }
      revokeAllOf(family.user);
      res.writeHead(204).end();
      return;
    }

    if (path === PROTECTED_PATH) {
      const claims = verifyAccessToken(header(req, 'x-okapi-token') ?? '');
      if (!claims || claims.tenant !== tenant || claims.exp * 1000 <= Date.now()) {
        counters.protectedRejected++;
        text(res, 401, 'Invalid token');
        return;
      }
      counters.protectedAccepted++;
      json(res, 200, { status: 'ok' });
      return;
    }
    text(res, 404, `No suitable module found for path ${path} for tenant ${tenant}`);
  };

  const server = createServer((req, res) => {
    handle(req, res).catch(() => {
      if (!res.headersSent) text(res, 500, 'Internal server error');
    });
  });
  await listen(server, 0);
  const { port } = server.address() as AddressInfo;
  const url = `http://127.0.0.1:${port}`;

  const post = (path: string, headers: Record<string, string>, body?: string) =>
    fetch(`${url}${path}`, {
      method: 'POST',
      headers: { accept: 'application/json', ...headers },
      ...(body === undefined ? {} : { body }),
    });
  const readPair = async (response: Response): Promise<FolioPair> => {
    const setCookies = response.headers.getSetCookie();
    const value = (name: string) =>
      setCookies
        .find((c) => c.startsWith(`${name}=`))
        ?.split(';')[0]
        ?.slice(name.length + 1) ?? '';
    return {
      status: response.status,
      accessToken: value('folioAccessToken'),
      refreshToken: value('folioRefreshToken'),
      setCookies,
      body: (await response.json()) as Record<string, unknown>,
    };
  };

  return {
    url,
    port,
    counters,
    addUser(tenant, username, password) {
      users.set(userKey(tenant, username), { id: randomUUID(), tenant, username, password });
    },
    setPassword(tenant, username, password) {
      const user = users.get(userKey(tenant, username));
      if (!user) throw new Error(`no user ${username} in ${tenant}`);
      user.password = password;
    },
    revokeUser(tenant, username) {
      const user = users.get(userKey(tenant, username));
      return user ? revokeAllOf(user) : 0;
    },
    refreshesInFamilyOf(token) {
      return (refreshTokens.get(token)?.family ?? familyOfAccess.get(token))?.refreshes ?? 0;
    },
    familiesOf(tenant, username) {
      return familiesByUser.get(userKey(tenant, username))?.length ?? 0;
    },
    resetCounters() {
      Object.assign(counters, zeroCounters());
    },
    setFault(next) {
      fault = next === undefined ? undefined : { fault: next, left: next.times ?? 1 };
    },
    async login(tenant, username, password) {
      const response = await post(
        '/authn/login-with-expiry',
        { 'x-okapi-tenant': tenant, 'content-type': 'application/json' },
        JSON.stringify({ username, password }),
      );
      if (response.status !== 201) throw new Error(`login failed: HTTP ${response.status}`);
      return readPair(response);
    },
    async refresh(tenant, refreshToken) {
      const response = await post('/authn/refresh', {
        'x-okapi-tenant': tenant,
        cookie: `folioRefreshToken=${refreshToken}`,
      });
      if (response.status !== 201) {
        await response.arrayBuffer();
        return { status: response.status };
      }
      return readPair(response);
    },
    async logout(tenant, refreshToken) {
      const response = await post('/authn/logout', {
        'x-okapi-tenant': tenant,
        cookie: `folioRefreshToken=${refreshToken}`,
      });
      await response.arrayBuffer();
      return response.status;
    },
    async callProtected(tenant, accessToken) {
      const response = await fetch(`${url}${PROTECTED_PATH}`, {
        method: 'POST',
        headers: { 'x-okapi-tenant': tenant, 'x-okapi-token': accessToken },
      });
      await response.arrayBuffer();
      return response.status;
    },
    stopListening: () => stopServer(server),
    async resumeListening() {
      if (!server.listening) await listen(server, port);
    },
    close: () => stopServer(server),
  };
}

function zeroCounters(): FolioCounters {
  return {
    logins: 0,
    loginFailures: 0,
    refreshRequests: 0,
    refreshes: 0,
    refreshRejections: 0,
    reuses: 0,
    revocations: 0,
    logouts: 0,
    protectedAccepted: 0,
    protectedRejected: 0,
    faultsInjected: 0,
  };
}

function header(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/** The folioRefreshToken from the Cookie header; other cookies are ignored, as mod-login does. */
function refreshCookie(req: IncomingMessage): string | undefined {
  for (const part of (header(req, 'cookie') ?? '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === 'folioRefreshToken') {
      const value = part.slice(eq + 1).trim();
      return value === '' ? undefined : value;
    }
  }
  return undefined;
}

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

function text(res: ServerResponse, status: number, body: string): void {
  res.writeHead(status, { 'content-type': 'text/plain' });
  res.end(body);
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

async function listen(server: Server, port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
}

async function stopServer(server: Server): Promise<void> {
  if (!server.listening) return;
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeAllConnections();
  await closed;
  await sleep(20);
}
