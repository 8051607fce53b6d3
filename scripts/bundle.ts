/**
 * Bundles the broker's and the webhook's compiled entry points (tsc's output in DIST) into one ES
 * module each: DIST/bin/broker.js and DIST/bin/webhook.js, what the broker image and `npm start`
 * run. Usage: bundle.ts [DIST] (default dist).
 *
 * Why: a start spent most of its time in Node's module system (resolving, reading and linking
 * some 400 files, lexing each CommonJS one for its exports), not in the broker (bench/startup.ts).
 *
 * What stays a separate package, loaded from node_modules as before: every dependency the
 * OpenTelemetry instrumentations patch as it loads (@grpc/grpc-js, ioredis; node:http is built
 * in), the SDK itself, pino (its transports load files by name) and whatever those bring. A
 * bundled copy of an instrumented package would run unpatched, without its spans. Only the
 * project's own code and the libraries in BUNDLED, which nothing instruments, are bundled.
 * Source maps chain to tsc's, so `--enable-source-maps` shows TypeScript lines.
 *
 * The sidecar is not bundled: it runs tsc's output (dist/sidecar/main.js). Bundled, it started
 * ~30 ms sooner but, under the image's heap flags (64 MiB old space, 8 MiB semi-spaces), served
 * 2,000 users at 0.45 of bare node:http instead of 0.65, with 32 full (mark-compact) collections in
 * a run instead of 2 (bench/sidecar-throughput.ts, --trace-gc). With V8's default heap the two
 * served alike. Why the bundle promotes more to the old space is not understood yet.
 */
import { readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { pathToFileURL } from 'node:url';

/**
 * The entry points bundled (tsc's output, relative to DIST), by their bundle's name in DIST/bin/.
 * scripts/dev/node-process.ts runs these bundles for a `compiled` spawn.
 */
export const BUNDLED_ENTRIES = {
  broker: 'broker/main.js',
  webhook: 'webhook/main.js',
} as const;

/**
 * Dependencies nothing instruments: safe to bundle. @opentelemetry/api keeps its state on
 * globalThis (one registry per major version), so the bundled copy and the SDK's own share the
 * providers the SDK registers. pino runs here without transports (the only part of it that loads
 * files by name): it writes JSON lines to stdout.
 */
const BUNDLED = new Set([
  'jose',
  'yaml',
  'pino',
  '@opentelemetry/api',
  '@bufbuild/protobuf',
  '@sesamecare-oss/redlock',
]);

async function bundle(dist: string): Promise<void> {
  const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as {
    dependencies: Record<string, string>;
  };
  const external = Object.keys(pkg.dependencies)
    .filter((name) => !BUNDLED.has(name))
    .flatMap((name) => [name, `${name}/*`]);
  for (const name of BUNDLED)
    if (!(name in pkg.dependencies)) throw new Error(`bundle.ts: ${name} is not a dependency`);

  const { build } = await import('esbuild');
  const result = await build({
    entryPoints: Object.fromEntries(
      Object.entries(BUNDLED_ENTRIES).map(([name, entry]) => [name, join(dist, entry)]),
    ),
    outdir: join(dist, 'bin'),
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node22',
    external,
    sourcemap: true,
    metafile: true,
    logLevel: 'warning',
    // Bundled CommonJS code (yaml) requires Node's built-ins: give it a require of its own.
    banner: {
      js: "import { createRequire as tbCreateRequire } from 'node:module';\nconst require = tbCreateRequire(import.meta.url);",
    },
  });
  for (const [file, output] of Object.entries(result.metafile.outputs))
    if (file.endsWith('.js'))
      console.log(
        `${relative('.', file)}: ${(output.bytes / 1024).toFixed(0)} KiB from ${Object.keys(output.inputs).length} modules`,
      );
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href)
  await bundle(process.argv[2] ?? 'dist');
