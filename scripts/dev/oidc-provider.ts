/**
 * A real OpenID Provider (panva's oidc-provider v9) running in-process on http://127.0.0.1:PORT,
 * for tests of refresh-token rotation.
 *
 *   const idp = await startOidcProvider({ accessTokenTtlSeconds: 3 });
 *   const first = await idp.mintTokens('alice');          // client 'basic' unless named
 *   idp.setFault({ kind: 'status', status: 503, retryAfterSeconds: 1, times: 2 });
 *   idp.counters.refreshes; idp.presentationsOf(rt);        // assert an RT was presented once
 *   await idp.stopListening(); await idp.resumeListening(); // ECONNREFUSED, then the same port
 *   await idp.close();
 *
 * Behaviour: every successful refresh rotates the refresh token (rotateRefreshToken: true).
 * Presenting a consumed refresh token is answered invalid_grant and revokes the whole grant, so
 * the newest refresh token of that family dies too (oidc-provider's own reuse detection).
 * Tokens are opaque unless `jwtAccessTokens` names an audience: then every access token (minted
 * or refreshed) is an RS256 JWT for that audience, verifiable against `jwksUri`, with `exp` = `iat`
 * + the access-token TTL. Two confidential clients: `basic` (client_secret_basic) and `post`
 * (client_secret_post); a token belongs to the client that minted it.
 *
 * mintTokens() uses the custom grant MINT_GRANT_TYPE with an `account` parameter: it creates a
 * grant for `openid offline_access` and returns an access and a refresh token, no browser needed.
 *
 * Counters (read live from `counters`; resetCounters() zeroes them and the presentations):
 *   refreshRequests  token-endpoint requests with grant_type=refresh_token, faulted ones included
 *   refreshes        successful refresh_token grants (each one consumed a refresh token)
 *   invalidGrants    refresh requests answered invalid_grant
 *   reuses           consumed refresh tokens presented again (reuse detection fired)
 *   revokedGrants    grants revoked by the provider (reuse detection, revocation endpoint)
 *   revocations      requests to the revocation endpoint answered 200
 *   mints            successful mintTokens() grants
 *   faultsInjected   requests answered or cut by setFault() instead of by the provider
 *   serverErrors     provider `server_error` events: a harness or provider bug, expect 0
 * presentations() counts, per SHA-256 hex of a refresh token, the refresh requests carrying it
 * that reached the provider (a `status` fault answers before the provider, so it does not count).
 * Token values themselves are never stored here.
 *
 * `tokenExchange: true` registers the RFC 8693 grant TOKEN_EXCHANGE_GRANT_TYPE for both clients:
 * a valid access token of this provider (`subject_token`, type access_token) is exchanged for a
 * new grant of the same account, issued to the calling client. With `requested_token_type`
 * refresh_token the answer carries an access and a refresh token (as Keycloak's standard token
 * exchange does), otherwise only an access token. The new grant is independent: revoking the
 * subject's grant (a browser logout) leaves it alive, and revokeGrantOf() does not touch it.
 * Counted in `exchanges`.
 *
 * Faults apply to every token-endpoint request (mints included) until replaced, or for the next
 * `times` requests. `delay` waits before the provider reads the request (a client that gives up
 * meanwhile consumed nothing); `slow-answer` lets the provider process it at once and holds the
 * answer back (a client that gives up lost the new token). `drop-response` lets the provider process the request (rotating the token)
 * and then resets the connection without answering: the client never learns the new token.
 * A request in flight when stopListening() is called may or may not have been processed.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';

import { exportJWK, generateKeyPair } from 'jose';
import type { Context as KoaContext, Next } from 'koa';
import Provider, {
  errors,
  type Adapter,
  type AdapterPayload,
  type Configuration,
  type KoaContextWithOIDC,
  type OIDCContext,
} from 'oidc-provider';

export const MINT_GRANT_TYPE = 'urn:token-broker:test:mint';
export const TOKEN_EXCHANGE_GRANT_TYPE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const REFRESH_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:refresh_token';
const MINT_SCOPE = 'openid offline_access';
const TOKEN_PATH = '/token';
const REVOCATION_PATH = '/token/revocation';
const INTROSPECTION_PATH = '/token/introspection';
const REUSE_DETAIL = 'refresh token already used';
/** The scope a JWT access token's resource server grants (see `jwtAccessTokens`). */
const RESOURCE_SCOPE = 'api';

export type ClientKind = 'basic' | 'post';

export interface ClientCredentials {
  readonly clientId: string;
  readonly clientSecret: string;
}

export type Fault =
  | { kind: 'none' }
  | { kind: 'status'; status: 503 | 429 | 500; retryAfterSeconds?: number; times?: number }
  | { kind: 'delay'; ms: number; times?: number }
  /** The provider processes the request at once (consuming the token), the answer waits `ms`. */
  | { kind: 'slow-answer'; ms: number; times?: number }
  | { kind: 'drop-response'; times?: number };

export interface MintedTokens {
  access_token: string;
  refresh_token: string;
  expires_in: number;
  token_type: string;
}

export interface OidcCounters {
  refreshRequests: number;
  refreshes: number;
  invalidGrants: number;
  reuses: number;
  revokedGrants: number;
  revocations: number;
  mints: number;
  /** Successful token exchanges (with `tokenExchange`). */
  exchanges: number;
  faultsInjected: number;
  serverErrors: number;
  /** Refresh tokens presented again inside `reuseGraceMs` and answered as the first time. */
  graceReplays: number;
  /** Introspection requests (any answer). */
  introspections: number;
}

export interface OidcProviderOptions {
  /** Access-token lifetime; default 3. */
  accessTokenTtlSeconds?: number;
  /** Lifetime of each refresh token (renewed on rotation); default 1 day. */
  refreshTokenTtlSeconds?: number;
  /** Fixed credentials; by default ids `tb-basic`/`tb-post` and random secrets. */
  clients?: Partial<Record<ClientKind, ClientCredentials>>;
  /**
   * Issue access tokens as JWTs for this resource (RFC 8707 resource indicator, also the `aud`),
   * so a resource server can verify them offline. Default: opaque access tokens.
   */
  jwtAccessTokens?: { audience: string };
  /** Register the RFC 8693 token-exchange grant for both clients; default off. */
  tokenExchange?: boolean;
  /**
   * Keycloak-like SSO session maximum: every refresh token of a family expires this many seconds
   * after the family began (rotation does not extend it), the token response says how long is
   * left in `refresh_expires_in`, and past it the family's refresh token is refused
   * (invalid_grant). Default: none (each rotated refresh token lives refreshTokenTtlSeconds).
   */
  sessionMaxSeconds?: number;
  /**
   * A reuse grace period (as Okta, Auth0 and Hydra offer): a consumed refresh token presented
   * again within this many ms of its rotation gets the same answer again instead of reuse
   * detection. Counted in `graceReplays`. Default 0: none.
   */
  reuseGraceMs?: number;
  /**
   * Introspection that knows only access tokens (as some servers ship): every refresh token,
   * live or not, is answered `active: false`. Default off: the provider's own introspection.
   */
  introspectionKnowsOnlyAccessTokens?: boolean;
}

export interface OidcProviderHarness {
  readonly issuer: string;
  readonly port: number;
  readonly tokenEndpoint: string;
  readonly revocationEndpoint: string;
  /** RFC 7662 introspection (a client may introspect its own tokens). */
  readonly introspectionEndpoint: string;
  /** The provider's public signing keys (JWKS), for verifying JWT access tokens. */
  readonly jwksUri: string;
  readonly clients: Readonly<Record<ClientKind, ClientCredentials>>;
  /** Live counters; the object is updated in place. */
  readonly counters: Readonly<OidcCounters>;
  /** The oidc-provider instance, for what this harness does not wrap. */
  readonly provider: Provider;
  mintTokens(accountId: string, client?: ClientKind): Promise<MintedTokens>;
  /** POSTs a form to the token endpoint, authenticated as `client` with its own method. */
  postToken(params: Record<string, string>, client?: ClientKind): Promise<Response>;
  /** Refresh requests that reached the provider, keyed by SHA-256 hex of the refresh token. */
  presentations(): ReadonlyMap<string, number>;
  presentationsOf(refreshToken: string): number;
  /** When each presentation arrived (epoch ms, before any injected delay), by token hash. */
  presentationTimes(): ReadonlyMap<string, readonly number[]>;
  /** Token-endpoint POSTs that arrived, counted before any fault or delay applies. */
  tokenRequestsArrived(): number;
  resetCounters(): void;
  setFault(fault: Fault): void;
  /** Revokes every grant minted for the account: its refresh tokens then get invalid_grant. */
  revokeGrantOf(accountId: string): Promise<number>;
  /** Closes the listener and destroys open connections: clients get ECONNREFUSED. */
  stopListening(): Promise<void>;
  /** Listens again on the same port. */
  resumeListening(): Promise<void>;
  close(): Promise<void>;
}

function epochSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

export function sha256Hex(value: string): string {
  return createHash('sha256').update(value).digest('hex');
}

export async function startOidcProvider(
  options: OidcProviderOptions = {},
): Promise<OidcProviderHarness> {
  const accessTokenTtl = options.accessTokenTtlSeconds ?? 3;
  const refreshTokenTtl = options.refreshTokenTtlSeconds ?? 24 * 60 * 60;
  const clients: Record<ClientKind, ClientCredentials> = {
    basic: options.clients?.basic ?? { clientId: 'tb-basic', clientSecret: randomSecret() },
    post: options.clients?.post ?? { clientId: 'tb-post', clientSecret: randomSecret() },
  };

  // The issuer names the port, so bind first and hand requests to the provider once it exists.
  let handle: (req: IncomingMessage, res: ServerResponse) => void = (_req, res) => {
    res.statusCode = 503;
    res.end();
  };
  const server = createServer((req, res) => handle(req, res));
  await listen(server, 0);
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no TCP address');
  const { port } = address;
  const issuer = `http://127.0.0.1:${port}`;

  const store = new TokenStore();
  const jwtAudience = options.jwtAccessTokens?.audience;
  const resourceServer = {
    scope: RESOURCE_SCOPE,
    audience: jwtAudience,
    accessTokenFormat: 'jwt' as const,
    accessTokenTTL: accessTokenTtl,
  };
  const provider = new Provider(issuer, {
    adapter: (model: string) => store.adapterFor(model),
    clients: (['basic', 'post'] as const).map((kind) => ({
      client_id: clients[kind].clientId,
      client_secret: clients[kind].clientSecret,
      token_endpoint_auth_method: kind === 'basic' ? 'client_secret_basic' : 'client_secret_post',
      grant_types: [
        'refresh_token',
        MINT_GRANT_TYPE,
        ...(options.tokenExchange ? [TOKEN_EXCHANGE_GRANT_TYPE] : []),
      ],
      response_types: [],
      redirect_uris: [],
    })),
    jwks: { keys: [await signingKey()] },
    rotateRefreshToken: true,
    ttl: {
      AccessToken: accessTokenTtl,
      RefreshToken:
        options.sessionMaxSeconds === undefined
          ? refreshTokenTtl
          : (_ctx: unknown, token: { iiat?: number }) =>
              Math.max(
                1,
                (token.iiat ?? epochSeconds()) + options.sessionMaxSeconds! - epochSeconds(),
              ),
      // The grant outlives any one refresh token: the family dies by reuse or revocation.
      Grant: Math.max(refreshTokenTtl, 30 * 24 * 60 * 60),
      IdToken: 3600,
      ClientCredentials: 600,
      Interaction: 600,
      Session: 3600,
    },
    routes: { token: TOKEN_PATH, revocation: REVOCATION_PATH },
    features: {
      devInteractions: { enabled: false },
      revocation: {
        enabled: true,
        allowedPolicy: (_ctx, client, token) => token.clientId === client.clientId,
      },
      // RFC 7662: a client may ask whether a refresh token it holds is still active.
      introspection: {
        enabled: true,
        allowedPolicy: (_ctx, client, token) => token.clientId === client.clientId,
      },
      ...(jwtAudience === undefined
        ? {}
        : {
            // Refreshes keep the resource the grant was minted for, so each new AT is a JWT too.
            resourceIndicators: {
              enabled: true,
              defaultResource: () => jwtAudience,
              useGrantedResource: () => true,
              getResourceServerInfo: (_ctx, resource) => {
                if (resource !== jwtAudience) throw new errors.InvalidTarget();
                return resourceServer;
              },
            },
          }),
    },
    // The defaults of these print development notices.
    findAccount: (_ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
    clientBasedCORS: () => false,
    renderError: (ctx, out) => {
      ctx.type = 'json';
      ctx.body = out;
    },
  } satisfies Configuration);

  const counters: OidcCounters = zeroCounters();
  const presented = new Map<string, number>();
  const presentedAt = new Map<string, number[]>();
  let arrived = 0;
  const grantsByAccount = new Map<string, Set<string>>();

  provider.registerGrantType<{ account?: string }>(
    MINT_GRANT_TYPE,
    async (ctx) => {
      const accountId = ctx.oidc.params.account;
      if (typeof accountId !== 'string' || accountId === '') {
        throw new errors.InvalidRequest('missing required parameter: account');
      }
      const { client } = ctx.oidc;
      const grant = new provider.Grant({ accountId, clientId: client.clientId });
      grant.addOIDCScope(MINT_SCOPE);
      if (jwtAudience !== undefined) grant.addResourceScope(jwtAudience, RESOURCE_SCOPE);
      const grantId = await grant.save();
      let grants = grantsByAccount.get(accountId);
      if (!grants) grantsByAccount.set(accountId, (grants = new Set()));
      grants.add(grantId);

      const common = {
        accountId,
        client,
        grantId,
        gty: MINT_GRANT_TYPE,
        scope: MINT_SCOPE,
        ...(jwtAudience === undefined ? {} : { resource: jwtAudience }),
      };
      const at = new provider.AccessToken(common);
      if (jwtAudience !== undefined)
        at.resourceServer = new provider.ResourceServer(jwtAudience, resourceServer);
      const accessToken = await at.save();
      const refreshToken = await new provider.RefreshToken(common).save();
      ctx.body = {
        access_token: accessToken,
        token_type: 'Bearer',
        expires_in: at.expiration,
        refresh_token: refreshToken,
        scope: MINT_SCOPE,
      };
    },
    ['account'],
  );

  if (options.tokenExchange) {
    provider.registerGrantType<{
      subject_token?: string;
      subject_token_type?: string;
      requested_token_type?: string;
    }>(
      TOKEN_EXCHANGE_GRANT_TYPE,
      async (ctx) => {
        const { subject_token, subject_token_type, requested_token_type } = ctx.oidc.params;
        if (typeof subject_token !== 'string' || subject_token === '')
          throw new errors.InvalidRequest('missing required parameter: subject_token');
        if (subject_token_type !== ACCESS_TOKEN_TYPE)
          throw new errors.InvalidRequest('subject_token_type must be the access_token type');
        const requested = requested_token_type || ACCESS_TOKEN_TYPE;
        if (requested !== ACCESS_TOKEN_TYPE && requested !== REFRESH_TOKEN_TYPE)
          throw new errors.InvalidRequest('unsupported requested_token_type');
        const subject = await provider.AccessToken.find(subject_token);
        if (!subject || subject.isExpired)
          throw new errors.InvalidGrant('subject_token is invalid or expired');

        const { client } = ctx.oidc;
        const accountId = subject.accountId;
        const grant = new provider.Grant({ accountId, clientId: client.clientId });
        grant.addOIDCScope(MINT_SCOPE);
        if (jwtAudience !== undefined) grant.addResourceScope(jwtAudience, RESOURCE_SCOPE);
        const grantId = await grant.save();
        const common = {
          accountId,
          client,
          grantId,
          gty: TOKEN_EXCHANGE_GRANT_TYPE,
          scope: MINT_SCOPE,
          ...(jwtAudience === undefined ? {} : { resource: jwtAudience }),
        };
        const at = new provider.AccessToken(common);
        if (jwtAudience !== undefined)
          at.resourceServer = new provider.ResourceServer(jwtAudience, resourceServer);
        const accessToken = await at.save();
        const refreshToken =
          requested === REFRESH_TOKEN_TYPE
            ? await new provider.RefreshToken(common).save()
            : undefined;
        ctx.body = {
          access_token: accessToken,
          issued_token_type: requested,
          token_type: 'Bearer',
          expires_in: at.expiration,
          ...(refreshToken === undefined ? {} : { refresh_token: refreshToken }),
          scope: MINT_SCOPE,
        };
      },
      ['subject_token', 'subject_token_type', 'requested_token_type'],
    );
  }

  const grantTypeOf = (ctx: KoaContextWithOIDC): unknown => oidcOf(ctx)?.params?.['grant_type'];
  provider.on('grant.success', (ctx) => {
    const grantType = grantTypeOf(ctx);
    if (grantType === 'refresh_token') counters.refreshes++;
    else if (grantType === MINT_GRANT_TYPE) counters.mints++;
    else if (grantType === TOKEN_EXCHANGE_GRANT_TYPE) counters.exchanges++;
  });
  provider.on('grant.error', (ctx, err) => {
    if (grantTypeOf(ctx) !== 'refresh_token') return;
    if (err.error === 'invalid_grant') counters.invalidGrants++;
    if (err.error_detail === REUSE_DETAIL) counters.reuses++;
  });
  provider.on('grant.revoked', () => {
    counters.revokedGrants++;
  });
  provider.on('server_error', () => {
    counters.serverErrors++;
  });

  let fault: Fault = { kind: 'none' };
  let faultUsesLeft = Infinity;
  const takeFault = (): Fault => {
    const current = fault;
    if (current.kind !== 'none' && --faultUsesLeft <= 0) fault = { kind: 'none' };
    return current;
  };

  const recordPresentation = (ctx: KoaContext, arrivedAt: number): void => {
    const body = oidcOf(ctx)?.body;
    if (body?.['grant_type'] !== 'refresh_token') return;
    counters.refreshRequests++;
    const token = body['refresh_token'];
    if (typeof token === 'string') {
      const key = sha256Hex(token);
      presented.set(key, (presented.get(key) ?? 0) + 1);
      presentedAt.set(key, [...(presentedAt.get(key) ?? []), arrivedAt]);
    }
  };

  /** Keycloak's `refresh_expires_in`: what is left of the family's session maximum. */
  const addRefreshExpiresIn = async (ctx: KoaContext): Promise<void> => {
    const body = ctx.body as Record<string, unknown> | undefined;
    if (ctx.status !== 200 || typeof body?.refresh_token !== 'string') return;
    const token = await provider.RefreshToken.find(body.refresh_token);
    if (token?.exp !== undefined) body.refresh_expires_in = Math.max(0, token.exp - epochSeconds());
  };

  const graceMs = options.reuseGraceMs ?? 0;
  const graceAnswers = new Map<string, { at: number; body: unknown }>();
  provider.use(async (ctx: KoaContext, next: Next) => {
    if (ctx.method === 'POST' && ctx.path === INTROSPECTION_PATH) {
      counters.introspections++;
      if (!options.introspectionKnowsOnlyAccessTokens) {
        await next();
        return;
      }
      const token = (await readForm(ctx.req)).get('token') ?? '';
      const accessToken = await provider.AccessToken.find(token);
      ctx.status = 200;
      ctx.set('Cache-Control', 'no-store');
      ctx.body = { active: accessToken !== undefined && !accessToken.isExpired };
      return;
    }
    if (ctx.method === 'POST' && ctx.path === REVOCATION_PATH) {
      await next();
      if (ctx.status === 200) counters.revocations++;
      return;
    }
    if (ctx.method !== 'POST' || ctx.path !== TOKEN_PATH) {
      await next();
      return;
    }

    const arrivedAt = Date.now();
    arrived++;
    const active = takeFault();
    if (active.kind === 'status') {
      counters.faultsInjected++;
      const form = await readForm(ctx.req);
      if (form.get('grant_type') === 'refresh_token') counters.refreshRequests++;
      ctx.status = active.status;
      if (active.retryAfterSeconds !== undefined) {
        ctx.set('Retry-After', String(active.retryAfterSeconds));
      }
      ctx.set('Cache-Control', 'no-store');
      ctx.body = {
        error: active.status === 500 ? 'server_error' : 'temporarily_unavailable',
        error_description: `injected fault: HTTP ${active.status}`,
      };
      return;
    }
    if (active.kind === 'delay') await sleep(active.ms);
    let graceKey: string | undefined;
    if (graceMs > 0) {
      const form = await readForm(ctx.req);
      (ctx.request as { body?: unknown }).body = Object.fromEntries(form);
      const token = form.get('refresh_token');
      if (form.get('grant_type') === 'refresh_token' && token) {
        graceKey = sha256Hex(token);
        const earlier = graceAnswers.get(graceKey);
        if (earlier && arrivedAt - earlier.at <= graceMs) {
          counters.graceReplays++;
          counters.refreshRequests++;
          presented.set(graceKey, (presented.get(graceKey) ?? 0) + 1);
          presentedAt.set(graceKey, [...(presentedAt.get(graceKey) ?? []), arrivedAt]);
          ctx.status = 200;
          ctx.set('Cache-Control', 'no-store');
          ctx.body = earlier.body;
          return;
        }
      }
    }
    try {
      await next();
      if (options.sessionMaxSeconds !== undefined) await addRefreshExpiresIn(ctx);
    } finally {
      recordPresentation(ctx, arrivedAt);
    }
    if (graceKey !== undefined && ctx.status === 200)
      graceAnswers.set(graceKey, { at: Date.now(), body: ctx.body });
    if (active.kind === 'slow-answer') await sleep(active.ms);
    if (active.kind === 'drop-response') {
      counters.faultsInjected++;
      ctx.respond = false;
      ctx.req.socket.destroy();
    }
  });

  handle = provider.callback();

  const tokenEndpoint = `${issuer}${TOKEN_PATH}`;
  const postToken = async (
    params: Record<string, string>,
    client: ClientKind = 'basic',
  ): Promise<Response> => {
    const { clientId, clientSecret } = clients[client];
    const form = new URLSearchParams(params);
    const headers: Record<string, string> = {
      'content-type': 'application/x-www-form-urlencoded',
      accept: 'application/json',
    };
    if (client === 'basic') {
      const pair = `${encodeURIComponent(clientId)}:${encodeURIComponent(clientSecret)}`;
      headers['authorization'] = `Basic ${Buffer.from(pair).toString('base64')}`;
    } else {
      form.set('client_id', clientId);
      form.set('client_secret', clientSecret);
    }
    return fetch(tokenEndpoint, { method: 'POST', headers, body: form });
  };

  return {
    issuer,
    port,
    tokenEndpoint,
    revocationEndpoint: `${issuer}${REVOCATION_PATH}`,
    introspectionEndpoint: `${issuer}${INTROSPECTION_PATH}`,
    jwksUri: `${issuer}/jwks`,
    clients,
    counters,
    provider,
    postToken,
    async mintTokens(accountId, client = 'basic') {
      const res = await postToken({ grant_type: MINT_GRANT_TYPE, account: accountId }, client);
      const body = (await res.json()) as Partial<MintedTokens> & { error?: string };
      if (
        !res.ok ||
        typeof body.access_token !== 'string' ||
        typeof body.refresh_token !== 'string' ||
        typeof body.expires_in !== 'number'
      ) {
        throw new Error(`minting tokens failed: HTTP ${res.status} ${body.error ?? ''}`.trim());
      }
      return {
        access_token: body.access_token,
        refresh_token: body.refresh_token,
        expires_in: body.expires_in,
        token_type: body.token_type ?? 'Bearer',
      };
    },
    presentations: () => new Map(presented),
    presentationTimes: () => new Map(presentedAt),
    tokenRequestsArrived: () => arrived,
    presentationsOf: (refreshToken) => presented.get(sha256Hex(refreshToken)) ?? 0,
    resetCounters() {
      Object.assign(counters, zeroCounters());
      presented.clear();
      presentedAt.clear();
    },
    setFault(next) {
      fault = next;
      faultUsesLeft = next.kind === 'none' ? Infinity : (next.times ?? Infinity);
    },
    revokeGrantOf(accountId) {
      const grants = grantsByAccount.get(accountId) ?? new Set<string>();
      grantsByAccount.delete(accountId);
      for (const grantId of grants) store.revokeGrant(grantId);
      return Promise.resolve(grants.size);
    },
    stopListening: () => stopServer(server),
    async resumeListening() {
      if (server.listening) return;
      await listen(server, port);
    },
    close: () => stopServer(server),
  };
}

function zeroCounters(): OidcCounters {
  return {
    refreshRequests: 0,
    refreshes: 0,
    invalidGrants: 0,
    reuses: 0,
    revokedGrants: 0,
    revocations: 0,
    mints: 0,
    exchanges: 0,
    faultsInjected: 0,
    serverErrors: 0,
    graceReplays: 0,
    introspections: 0,
  };
}

/** ctx.oidc exists only once a provider route has started on the request. */
function oidcOf(ctx: KoaContext | KoaContextWithOIDC): OIDCContext | undefined {
  return (ctx as { oidc?: OIDCContext }).oidc;
}

function randomSecret(): string {
  return randomBytes(24).toString('base64url');
}

async function signingKey(): Promise<Record<string, unknown>> {
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  return { ...(await exportJWK(privateKey)), kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

async function stopServer(server: Server): Promise<void> {
  if (!server.listening) return;
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeAllConnections();
  await closed;
  // Let in-process clients see their pooled connections close, so that their next request
  // dials anew and is refused, rather than failing on a socket that died a moment ago.
  await sleep(20);
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

const FORM_LIMIT_BYTES = 64 * 1024;

async function readForm(req: IncomingMessage): Promise<URLSearchParams> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    const buf = chunk as Buffer;
    size += buf.length;
    if (size > FORM_LIMIT_BYTES) break;
    chunks.push(buf);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

interface Entry {
  payload: AdapterPayload;
  /** Epoch ms; Infinity when the provider gave no lifetime. */
  expiresAt: number;
}

/**
 * Unbounded in-memory storage for the provider. The built-in memory adapter is an LRU of 1000
 * entries, which a long test would overflow into spurious invalid_grant answers, and it prints a
 * development warning.
 */
class TokenStore {
  readonly #entries = new Map<string, Entry>();
  readonly #grantMembers = new Map<string, Set<string>>();
  #writesSinceSweep = 0;

  adapterFor(model: string): Adapter {
    const key = (id: string): string => `${model}:${id}`;
    const done = Promise.resolve();
    return {
      upsert: (id, payload, expiresIn) => done.then(() => this.#set(key(id), payload, expiresIn)),
      find: (id) => Promise.resolve(this.#get(key(id))),
      findByUid: (uid) => Promise.resolve(this.#findBy(model, (p) => p.uid === uid)),
      findByUserCode: (code) => Promise.resolve(this.#findBy(model, (p) => p.userCode === code)),
      consume: (id) =>
        done.then(() => {
          const entry = this.#entries.get(key(id));
          if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
        }),
      destroy: (id) => done.then(() => this.#delete(key(id))),
      revokeByGrantId: (grantId) => done.then(() => this.#revokeMembers(grantId)),
    };
  }

  /** Deletes the grant and every token issued under it. */
  revokeGrant(grantId: string): void {
    this.#revokeMembers(grantId);
    this.#delete(`Grant:${grantId}`);
  }

  #set(k: string, payload: AdapterPayload, expiresIn: number | undefined): void {
    this.#delete(k);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    this.#entries.set(k, { payload: { ...payload }, expiresAt });
    if (payload.grantId !== undefined && !k.startsWith('Grant:')) {
      let members = this.#grantMembers.get(payload.grantId);
      if (!members) this.#grantMembers.set(payload.grantId, (members = new Set()));
      members.add(k);
    }
    if (++this.#writesSinceSweep >= 1000) this.#sweep();
  }

  #get(k: string): AdapterPayload | undefined {
    const entry = this.#entries.get(k);
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      this.#delete(k);
      return undefined;
    }
    return { ...entry.payload };
  }

  #findBy(model: string, match: (p: AdapterPayload) => boolean): AdapterPayload | undefined {
    for (const [k, entry] of this.#entries) {
      if (k.startsWith(`${model}:`) && match(entry.payload)) return this.#get(k);
    }
    return undefined;
  }

  #delete(k: string): void {
    const entry = this.#entries.get(k);
    if (!entry) return;
    this.#entries.delete(k);
    const grantId = entry.payload.grantId;
    if (grantId !== undefined) this.#grantMembers.get(grantId)?.delete(k);
  }

  #revokeMembers(grantId: string): void {
    for (const k of this.#grantMembers.get(grantId) ?? []) this.#entries.delete(k);
    this.#grantMembers.delete(grantId);
  }

  #sweep(): void {
    this.#writesSinceSweep = 0;
    const now = Date.now();
    for (const [k, entry] of this.#entries) if (entry.expiresAt <= now) this.#delete(k);
  }
}
