/** The baseline: a bare node:http server on 127.0.0.1 answering every request with a constant. */
import { createServer } from 'node:http';

const body = process.argv[2] ?? '{"ok":true}';
const server = createServer((_req, res) => {
  res.writeHead(200, {
    'content-type': 'application/json',
    'cache-control': 'no-store',
    'content-length': Buffer.byteLength(body),
  });
  res.end(body);
});
server.listen(0, '127.0.0.1', () => {
  const address = server.address();
  if (address && typeof address === 'object') process.stdout.write(`${address.port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
