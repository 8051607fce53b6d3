/**
 * A resource server for end-to-end tests: node:http on 127.0.0.1 that accepts a request only if
 * its Bearer token is a JWT access token the OIDC provider signed, for this audience, and not
 * expired, with zero clock tolerance (jose jwtVerify against the provider's JWKS).
 *
 *   const rs = await startResourceServer({ issuer, jwksUri, audience });
 *   await fetch(rs.url, { headers: { authorization: `Bearer ${at}` } });  // 200 or 401
 *   rs.counters.accepted; rs.counters.rejected; rs.rejections;   // reasons, never token values
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createRemoteJWKSet, errors, jwtVerify } from 'jose';

export interface ResourceServer {
  readonly url: string;
  readonly counters: { accepted: number; rejected: number };
  /** Why each rejected request was rejected (jose error code), with when. */
  readonly rejections: { code: string; at: number }[];
  close(): Promise<void>;
}

export async function startResourceServer(options: {
  issuer: string;
  jwksUri: string;
  audience: string;
}): Promise<ResourceServer> {
  const jwks = createRemoteJWKSet(new URL(options.jwksUri));
  const counters = { accepted: 0, rejected: 0 };
  const rejections: { code: string; at: number }[] = [];
  const server = createServer((req, res) => {
    const header = req.headers.authorization ?? '';
    const token = header.startsWith('Bearer ') ? header.slice(7) : '';
    jwtVerify(token, jwks, {
      issuer: options.issuer,
      audience: options.audience,
      clockTolerance: 0,
    }).then(
      () => {
        counters.accepted++;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{"ok":true}');
      },
      (err: unknown) => {
        counters.rejected++;
        const code = err instanceof errors.JOSEError ? err.code : 'UNKNOWN';
        rejections.push({ code, at: Date.now() });
        res.writeHead(401, {
          'content-type': 'application/json',
          'www-authenticate': `Bearer error="invalid_token"`,
        });
        res.end(JSON.stringify({ error: 'invalid_token', code }));
      },
    );
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/resource`,
    counters,
    rejections,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
