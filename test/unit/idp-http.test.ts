/**
 * postOnce over node:http(s) keep-alive connections: what "sent" means on fresh, reused and
 * TLS sockets, the keep-alive race (a reused socket the IdP closes as the request arrives), and
 * the answer as the adapters read it. Real servers on 127.0.0.1:0.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { createServer as createNetServer, type AddressInfo, type Socket } from 'node:net';
import { gzipSync } from 'node:zlib';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';

import { IdpTransientError } from '../../broker/errors.js';
import { createKeepAliveTransport, postOnce, type SendOptions } from '../../broker/idp/idp-http.js';
import { makeCa, makeLeaf, type TestCa, type TestLeaf } from '../harness/test-certs.js';

const FORM = 'grant_type=refresh_token&refresh_token=rt-FAKE-sent-0001';

interface Seen {
  headers: IncomingMessage['headers'];
  body: string;
  /** Which connection (1, 2, ...) carried the request. */
  connection: number;
}
type Handler = (seen: Seen, req: IncomingMessage, res: ServerResponse) => void;

const closers: (() => Promise<void>)[] = [];
const transports: { close(): void }[] = [];

afterEach(async () => {
  for (const transport of transports.splice(0)) transport.close();
  await Promise.all(closers.splice(0).map((close) => close()));
});

function listen(server: Server | ReturnType<typeof createNetServer>): Promise<number> {
  return new Promise((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)),
  );
}

/** A server that records each request and lets `handler` answer it. */
async function idp(
  handler: Handler,
  tls?: { cert: string; key: string },
): Promise<{ url: string; seen: Seen[]; server: Server }> {
  const seen: Seen[] = [];
  const connections = new WeakMap<object, number>();
  let count = 0;
  const listener = (req: IncomingMessage, res: ServerResponse): void => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      if (!connections.has(req.socket)) connections.set(req.socket, ++count);
      const entry = {
        headers: req.headers,
        body: Buffer.concat(chunks).toString('utf8'),
        connection: connections.get(req.socket)!,
      };
      seen.push(entry);
      handler(entry, req, res);
    });
  };
  const server = tls === undefined ? createServer(listener) : createHttpsServer(tls, listener);
  const port = await listen(server);
  closers.push(
    () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  );
  return { url: `${tls === undefined ? 'http' : 'https'}://127.0.0.1:${port}/token`, seen, server };
}

function options(overrides: Partial<SendOptions> = {}): SendOptions {
  const transport = createKeepAliveTransport();
  transports.push(transport);
  return {
    where: 'test IdP',
    timeoutMs: 1_000,
    answerWaitMs: 5_000,
    signal: new AbortController().signal,
    transport,
    ...overrides,
  };
}

async function failure(promise: Promise<unknown>): Promise<IdpTransientError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(IdpTransientError);
    return err as IdpTransientError;
  }
  throw new Error('expected a rejection');
}

const ok = (res: ServerResponse): void => {
  res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
};
const form = { 'content-type': 'application/x-www-form-urlencoded' };

describe('postOnce over keep-alive connections', () => {
  it('sends the exact Content-Length, no chunking, and reuses one connection for calls in turn', async () => {
    const server = await idp((_seen, _req, res) => ok(res));
    const send = options();
    for (let i = 0; i < 3; i++) {
      const answer = await postOnce(server.url, form, FORM, send);
      expect(answer).toMatchObject({ status: 200, text: '{"ok":true}' });
    }
    expect(server.seen.map((s) => s.connection)).toEqual([1, 1, 1]);
    for (const seen of server.seen) {
      expect(seen.headers['content-length']).toBe(String(Buffer.byteLength(FORM)));
      expect(seen.headers['transfer-encoding']).toBeUndefined();
      expect(seen.body === FORM).toBe(true);
    }
  });

  it('counts a non-ASCII body in UTF-8 bytes and delivers it intact', async () => {
    const server = await idp((_seen, _req, res) => ok(res));
    const json = JSON.stringify({ username: 'jöhn', password: 'pässwörd-€-𝄞' });
    await postOnce(server.url, { 'content-type': 'application/json' }, json, options());
    expect(server.seen[0]!.headers['content-length']).toBe(String(Buffer.byteLength(json)));
    expect(server.seen[0]!.body === json).toBe(true);
  });

  it('a reused socket the IdP drops as the request arrives is presented, and never resent', async () => {
    const server = await idp((seen, req, res) => {
      // The keep-alive race: the IdP closes the idle connection just as the next request lands.
      if (seen.connection === 1 && server.seen.length === 2) req.socket.destroy();
      else ok(res);
    });
    const send = options();
    await postOnce(server.url, form, FORM, send);
    const err = await failure(postOnce(server.url, form, FORM, send));
    expect(err.presented).toBe(true);
    expect(err.outcomeUnknown).toBe(true);
    expect(err.message).toContain('ECONNRESET');
    expect(server.seen).toHaveLength(2);
    // The next call gets a fresh connection.
    await postOnce(server.url, form, FORM, send);
    expect(server.seen.map((s) => s.connection)).toEqual([1, 1, 2]);
  });

  it('a reused socket reset before the IdP read a byte is presented all the same: bytes were written', async () => {
    const tcp = createNetServer((socket) => {
      let requests = 0;
      socket.on('data', () => {
        requests += 1;
        if (requests === 1) {
          socket.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}');
        } else {
          socket.resetAndDestroy();
        }
      });
    });
    const port = await listen(tcp);
    closers.push(() => new Promise<void>((resolve) => tcp.close(() => resolve())));
    const send = options();
    const url = `http://127.0.0.1:${port}/token`;
    expect((await postOnce(url, form, FORM, send)).text).toBe('{}');
    const err = await failure(postOnce(url, form, FORM, send));
    expect(err.presented).toBe(true);
  });

  it('an idle connection the IdP closed is not reused: the next call connects afresh and succeeds', async () => {
    const server = await idp((_seen, _req, res) => ok(res));
    const send = options();
    await postOnce(server.url, form, FORM, send);
    server.server.closeIdleConnections();
    await new Promise((resolve) => setTimeout(resolve, 50));
    await postOnce(server.url, form, FORM, send);
    expect(server.seen.map((s) => s.connection)).toEqual([1, 2]);
  });

  it('the idle-socket timeout closes only idle sockets: a slow answer on a busy one is awaited', async () => {
    const server = await idp((_seen, _req, res) => {
      setTimeout(() => ok(res), 400);
    });
    const transport = createKeepAliveTransport({ idleMs: 100 });
    transports.push(transport);
    const send = options({ transport, timeoutMs: 200, answerWaitMs: 5_000 });
    for (let i = 0; i < 2; i++)
      expect((await postOnce(server.url, form, FORM, send)).status).toBe(200);
    // Idle past idleMs: the socket is closed by the broker, and the next call connects afresh.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect((await postOnce(server.url, form, FORM, send)).status).toBe(200);
    expect(server.seen.map((s) => s.connection)).toEqual([1, 1, 2]);
  });

  it('connection refused is not presented', async () => {
    const tcp = createNetServer();
    const port = await listen(tcp);
    await new Promise<void>((resolve) => tcp.close(() => resolve()));
    const err = await failure(postOnce(`http://127.0.0.1:${port}/token`, form, FORM, options()));
    expect(err.presented).toBe(false);
    expect(err.message).toContain('ECONNREFUSED');
  });

  it('a TCP connection whose TLS handshake never completes times out unsent, at timeoutMs', async () => {
    const held: Socket[] = [];
    const tcp = createNetServer((socket) => held.push(socket));
    const port = await listen(tcp);
    closers.push(
      () =>
        new Promise<void>((resolve) => {
          for (const socket of held) socket.destroy();
          tcp.close(() => resolve());
        }),
    );
    const err = await failure(
      postOnce(`https://127.0.0.1:${port}/token`, form, FORM, options({ timeoutMs: 200 })),
    );
    expect(err.presented).toBe(false);
    expect(err.message).toContain('within 200 ms');
    expect(held).toHaveLength(1);
  });

  it('a caller abort while the answer is awaited is presented', async () => {
    const controller = new AbortController();
    const server = await idp(() => controller.abort());
    const err = await failure(
      postOnce(server.url, form, FORM, options({ signal: controller.signal })),
    );
    expect(err.presented).toBe(true);
    expect(err.message).toContain('aborted by the caller after the request was sent');
  });

  it('returns a 3xx as an answer, never following it', async () => {
    const server = await idp((_seen, _req, res) => {
      if (server.seen.length === 1) res.writeHead(307, { location: '/elsewhere' }).end();
      else ok(res);
    });
    const answer = await postOnce(server.url, form, FORM, options());
    expect(answer.status).toBe(307);
    expect(answer.headers.get('Location')).toBe('/elsewhere');
    expect(server.seen).toHaveLength(1);
  });

  it('reads headers as fetch did: repeated fields joined, Set-Cookie apart, absent is null', async () => {
    const server = await idp((_seen, _req, res) => {
      res.setHeader('set-cookie', ['a=1; Path=/', 'b=2; Path=/']);
      res.setHeader('retry-after', '7');
      res.setHeader('x-many', ['one', 'two']);
      res.writeHead(503).end();
    });
    const answer = await postOnce(server.url, form, undefined, options());
    expect(answer.status).toBe(503);
    expect(answer.headers.get('Retry-After')).toBe('7');
    expect(answer.headers.get('x-many')).toBe('one, two');
    expect(answer.headers.get('x-absent')).toBeNull();
    expect(answer.headers.getSetCookie()).toEqual(['a=1; Path=/', 'b=2; Path=/']);
    expect(answer.text).toBe('');
  });

  it('decodes a compressed answer and drops a BOM, as fetch did; an unknown coding fails presented', async () => {
    const server = await idp((_seen, _req, res) => {
      if (server.seen.length === 1) {
        res
          .writeHead(200, { 'content-encoding': 'gzip' })
          .end(gzipSync(Buffer.from('\ufeff{"zipped":true}', 'utf8')));
      } else {
        res.writeHead(200, { 'content-encoding': 'zstd-of-the-future' }).end('??');
      }
    });
    const send = options();
    expect((await postOnce(server.url, form, FORM, send)).text).toBe('{"zipped":true}');
    const err = await failure(postOnce(server.url, form, FORM, send));
    expect(err.presented).toBe(true);
  });

  it('an answer cut short mid-body is presented', async () => {
    const server = await idp((_seen, req, res) => {
      res.writeHead(200, { 'content-length': '100' });
      res.write('{"access_token":');
      setTimeout(() => req.socket.destroy(), 20);
    });
    const err = await failure(postOnce(server.url, form, FORM, options()));
    expect(err.presented).toBe(true);
  });
});

describe('postOnce over https', () => {
  let ca: TestCa;
  let leaf: TestLeaf;
  beforeAll(async () => {
    ca = await makeCa('idp-http-test-ca');
    leaf = await makeLeaf(ca, { commonName: 'idp', ipAddresses: ['127.0.0.1'] });
  });

  it('posts over TLS with the configured trust, reusing the connection', async () => {
    const server = await idp((_seen, _req, res) => ok(res), {
      cert: leaf.certPem,
      key: leaf.keyPem,
    });
    const transport = createKeepAliveTransport({ ca: ca.certPem });
    transports.push(transport);
    const send = options({ transport });
    expect(server.url.startsWith('https://')).toBe(true);
    for (let i = 0; i < 2; i++)
      expect((await postOnce(server.url, form, FORM, send)).status).toBe(200);
    expect(server.seen.map((s) => s.connection)).toEqual([1, 1]);
  });

  it('a certificate the broker does not trust fails unsent', async () => {
    const server = await idp((_seen, _req, res) => ok(res), {
      cert: leaf.certPem,
      key: leaf.keyPem,
    });
    const err = await failure(postOnce(server.url, form, FORM, options()));
    expect(err.presented).toBe(false);
    expect(server.seen).toHaveLength(0);
  });
});

describe('postOnce inside a recording span', () => {
  it("sends the span's traceparent and records the answer's HTTP attributes on it", async () => {
    const { AsyncLocalStorageContextManager } = await import('@opentelemetry/context-async-hooks');
    const { W3CTraceContextPropagator } = await import('@opentelemetry/core');
    const { InMemorySpanExporter, SimpleSpanProcessor, TracerProvider } =
      await import('@opentelemetry/sdk-trace');
    const { context, propagation } = await import('@opentelemetry/api');
    const exporter = new InMemorySpanExporter();
    const provider = new TracerProvider({
      spanProcessors: [new SimpleSpanProcessor({ exporter })],
    });
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
    propagation.setGlobalPropagator(new W3CTraceContextPropagator());
    try {
      const server = await idp((_seen, _req, res) => ok(res));
      const tracer = provider.getTracer('test');
      const answer = await tracer.startActiveSpan('idp.refresh', async (span) => {
        try {
          return await postOnce(server.url, form, FORM, options());
        } finally {
          span.end();
        }
      });
      expect(answer.status).toBe(200);
      // Untraced, nothing is added.
      await postOnce(server.url, form, FORM, options());
      const [span] = exporter.getFinishedSpans();
      const { traceId, spanId } = span!.spanContext();
      expect(server.seen[0]!.headers.traceparent).toBe(`00-${traceId}-${spanId}-01`);
      expect(server.seen[1]!.headers.traceparent).toBeUndefined();
      expect(span!.attributes).toMatchObject({
        'http.request.method': 'POST',
        'http.response.status_code': 200,
        'server.address': '127.0.0.1',
        'server.port': Number(new URL(server.url).port),
      });
      // The caller's headers object is left as it was.
      expect(Object.keys(form)).toEqual(['content-type']);
    } finally {
      await provider.shutdown();
      context.disable();
      propagation.disable();
    }
  });
});
