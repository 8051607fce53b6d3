import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { OAuth2Adapter } from '../../broker/idp/oauth2-adapter.js';
import { IdpProtocolError } from '../../broker/errors.js';

const CTX = { tenant: 't', user: 'u' };
let server: Server | undefined;
afterEach(() => server?.close());

async function body(req: IncomingMessage): Promise<URLSearchParams> {
  let text = '';
  for await (const chunk of req) text += String(chunk);
  return new URLSearchParams(text);
}

/** A scripted IdP: discovery names an introspection endpoint that answers `answer`. */
async function idp(answer: (form: URLSearchParams) => object) {
  const seen: URLSearchParams[] = [];
  server = createServer((req, res) => {
    void (async () => {
      const base = `http://127.0.0.1:${(server!.address() as AddressInfo).port}`;
      if (req.url === '/.well-known/openid-configuration') {
        res.end(
          JSON.stringify({ token_endpoint: `${base}/token`, introspection_endpoint: `${base}/i` }),
        );
        return;
      }
      const form = await body(req);
      seen.push(form);
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(answer(form)));
    })();
  });
  await new Promise<void>((resolve) => server!.listen(0, '127.0.0.1', resolve));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return { base, seen };
}

function adapter(options: { issuer?: string; tokenEndpoint?: string; introspection?: string }) {
  return new OAuth2Adapter({
    name: 'test',
    issuer: options.issuer,
    tokenEndpoint: options.tokenEndpoint,
    introspectionEndpoint: options.introspection,
    clientId: 'c',
    clientSecret: 's',
    authMethod: 'client_secret_post',
    timeoutMs: 2_000,
  });
}

describe('OAuth2Adapter.isActive (RFC 7662)', () => {
  it('asks the endpoint found by discovery, with the token hinted as a refresh token', async () => {
    const { base, seen } = await idp((form) => ({ active: form.get('token') === 'live' }));
    const a = adapter({ issuer: base });
    expect(await a.isActive('live', AbortSignal.timeout(2_000), CTX)).toBe(true);
    expect(await a.isActive('spent', AbortSignal.timeout(2_000), CTX)).toBe(false);
    expect(seen[0]!.get('token_type_hint')).toBe('refresh_token');
    expect(seen[0]!.get('client_id')).toBe('c');
  });

  it('cannot tell without an endpoint, and rejects an answer without "active"', async () => {
    const { base } = await idp(() => ({ nope: 1 }));
    expect(
      await adapter({ tokenEndpoint: `${base}/token` }).isActive(
        'x',
        AbortSignal.timeout(2_000),
        CTX,
      ),
    ).toBeUndefined();
    await expect(
      adapter({ tokenEndpoint: `${base}/token`, introspection: `${base}/i` }).isActive(
        'x',
        AbortSignal.timeout(2_000),
        CTX,
      ),
    ).rejects.toBeInstanceOf(IdpProtocolError);
  });
});
