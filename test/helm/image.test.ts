/**
 * The images, without a Docker engine: deploy/docker/Dockerfile is read for what it promises
 * (Node.js 22, non-root, production modules, the two entry points), and its build is replayed here:
 * tsc -p tsconfig.build.json into a temporary dist/ (no .proto file: reflection is built from the
 * generated descriptor set) and scripts/bundle.ts into its bin/, then the broker and the sidecar
 * run from that layout, and the sidecar answers the chart's exec probes.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import {
  cpSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { get as httpsGet } from 'node:https';
import { builtinModules } from 'node:module';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { devIdentity } from '../../scripts/dev/dev-identity.js';
import { freePort } from '../../scripts/dev/free-port.js';
import { makeCa, makeLeaf } from '../harness/test-certs.js';
import { find, HelmCharts, REPO, type K8sObject } from './helm-harness.js';

const dockerfile = readFileSync(join(REPO, 'deploy', 'docker', 'Dockerfile'), 'utf8');
const pkg = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as {
  dependencies: Record<string, string>;
};

interface Stage {
  from: string;
  lines: string[];
}
function stages(): Map<string, Stage> {
  const result = new Map<string, Stage>();
  let current: Stage | undefined;
  // A line ending in a backslash continues on the next one, as Docker reads it.
  const lines = dockerfile
    .replace(/\\\n/g, ' ')
    .split('\n')
    .map((l) => l.trim().replace(/\s+/g, ' '));
  for (const line of lines) {
    const from = /^FROM\s+(\S+)\s+AS\s+(\S+)$/i.exec(line);
    if (from) result.set(from[2]!, (current = { from: from[1]!, lines: [] }));
    else if (current && line && !line.startsWith('#')) current.lines.push(line);
  }
  return result;
}
const entrypoint = (stage: string) =>
  JSON.parse(
    stages()
      .get(stage)!
      .lines.find((l) => l.startsWith('ENTRYPOINT'))!
      .slice('ENTRYPOINT'.length),
  ) as string[];

/** .dockerignore semantics for the patterns it uses: the last matching line wins. */
function inBuildContext(path: string): boolean {
  const patterns = readFileSync(join(REPO, '.dockerignore'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  let included = true;
  for (const pattern of patterns) {
    const negated = pattern.startsWith('!');
    const body = negated ? pattern.slice(1) : pattern;
    const matches = body === '*' || path === body || path.startsWith(`${body}/`);
    if (matches) included = negated;
  }
  return included;
}

describe('deploy/docker/Dockerfile', () => {
  it('builds on Node.js 22 and runs as a non-root user with production modules only', () => {
    expect(dockerfile).toMatch(/^ARG NODE_IMAGE=node:22-[a-z]+-slim$/m);
    const all = stages();
    expect([...all.keys()]).toEqual(['build', 'modules', 'runtime', 'sidecar', 'broker']);
    const build = all.get('build')!.lines;
    expect(build).toContain('RUN npx tsc -p tsconfig.build.json');
    // The entry points run bundled, made from tsc's output after it.
    const bundling = build.indexOf('RUN node --import tsx scripts/bundle.ts dist');
    expect(bundling).toBeGreaterThan(build.indexOf('RUN npx tsc -p tsconfig.build.json'));
    expect(all.get('modules')!.lines.join('\n')).toMatch(/npm ci --omit=dev/);
    const runtime = all.get('runtime')!.lines;
    expect(runtime).toContain('USER 1000:1000');
    expect(runtime.filter((l) => l.startsWith('COPY')).join('\n')).not.toMatch(
      /--from=build \/app\/node_modules/,
    );
    const telemetry = ['--import', './dist/shared/telemetry/register.js'];
    expect(entrypoint('broker')).toEqual(['node', ...telemetry, 'dist/bin/broker.js']);
    expect(entrypoint('sidecar')).toEqual(['node', ...telemetry, 'dist/sidecar/main.js']);
    // The broker is the last stage, so a build without --target gives it.
    expect([...all.keys()].at(-1)).toBe('broker');
  });

  it('sizes the V8 heap from the container memory limit, which this Node.js honours', () => {
    const env = stages()
      .get('runtime')!
      .lines.find((l) => l.startsWith('ENV NODE_OPTIONS='));
    expect(env).toBe('ENV NODE_OPTIONS=--max-old-space-size-percentage=50');
    // The sidecar's stage adds a small young generation to the same heap sizing.
    expect(stages().get('sidecar')!.lines).toContain(
      'ENV NODE_OPTIONS="--max-old-space-size-percentage=50 --max-semi-space-size=8"',
    );
    const options = env!.slice('ENV NODE_OPTIONS='.length);
    // The same Node.js the image runs (22, the node devDependency) takes it from NODE_OPTIONS and
    // sizes the old generation from the constrained memory (the cgroup limit), else the host's.
    const limits = execFileSync(
      process.execPath,
      [
        '-e',
        'const v8 = require("node:v8"), os = require("node:os");' +
          'const c = process.constrainedMemory();' +
          'const memory = c > 0 && c < os.totalmem() ? c : os.totalmem();' +
          'console.log(JSON.stringify({ limit: v8.getHeapStatistics().heap_size_limit, memory }));',
      ],
      { env: { PATH: process.env.PATH ?? '', NODE_OPTIONS: options }, encoding: 'utf8' },
    );
    const { limit, memory } = JSON.parse(limits) as { limit: number; memory: number };
    // heap_size_limit is the old generation plus the young one (at most 48 MiB).
    expect(limit).toBeGreaterThan(memory * 0.45);
    expect(limit).toBeLessThan(memory * 0.55 + 64 * 1024 * 1024);
  });

  it('has no package manager in the runtime stage: npm, npx, corepack and yarn are removed', () => {
    const all = stages();
    // Both images build on the runtime stage, which starts from the plain Node.js image.
    expect(all.get('runtime')!.from).toBe('${NODE_IMAGE}');
    expect(all.get('broker')!.from).toBe('runtime');
    expect(all.get('sidecar')!.from).toBe('runtime');
    const removal = all.get('runtime')!.lines.find((l) => l.startsWith('RUN rm -rf '));
    expect(removal, 'a RUN rm -rf in the runtime stage').toBeDefined();
    const removed = removal!.split(' ').slice(3);
    // Where the official node images install them (npm and corepack under lib/node_modules).
    const installed = [
      '/usr/local/lib/node_modules/npm',
      '/usr/local/lib/node_modules/corepack',
      '/usr/local/bin/npm',
      '/usr/local/bin/npx',
      '/usr/local/bin/corepack',
      '/usr/local/bin/yarn',
      '/usr/local/bin/yarnpkg',
      '/opt/yarn-v1.22.22',
    ];
    const covers = (path: string) =>
      removed.some((pattern) => {
        const glob = new RegExp(`^${pattern.replace(/[.]/g, '\\.').replace(/\*/g, '[^/]*')}(/|$)`);
        return glob.test(path);
      });
    for (const path of installed) expect(covers(path), path).toBe(true);
    // Nothing after the removal calls one again, and neither image starts through one.
    const later = [
      ...all.get('runtime')!.lines.slice(all.get('runtime')!.lines.indexOf(removal!) + 1),
      ...all.get('sidecar')!.lines,
      ...all.get('broker')!.lines,
    ];
    for (const line of later) expect(line).not.toMatch(/\b(npm|npx|corepack|yarn|pnpm)\b/);
    expect(entrypoint('broker')[0]).toBe('node');
    expect(entrypoint('sidecar')[0]).toBe('node');
  });

  it('copies only what .dockerignore leaves in the build context', () => {
    const sources = [...stages().values()]
      .flatMap((s) => s.lines)
      .filter((l) => l.startsWith('COPY ') && !l.includes('--from='))
      .flatMap((l) => l.split(/\s+/).slice(1, -1));
    expect(sources).toEqual(
      expect.arrayContaining([
        'package.json',
        'broker',
        'sidecar',
        'shared',
        'gen',
        'scripts/bundle.ts',
      ]),
    );
    for (const source of sources) {
      expect(existsSync(join(REPO, source)), source).toBe(true);
      expect(inBuildContext(source), source).toBe(true);
    }
    for (const left of [
      'node_modules',
      '.git',
      '.tools',
      'test',
      'deploy',
      'dist',
      'proto',
      'scripts',
    ])
      expect(inBuildContext(left), left).toBe(false);
  });
});

describe('the image layout, replayed', () => {
  let app: string;
  const children: ChildProcess[] = [];

  beforeAll(() => {
    app = mkdtempSync(join(tmpdir(), 'tb-image-'));
    execFileSync(
      process.execPath,
      [
        join(REPO, 'node_modules', 'typescript', 'bin', 'tsc'),
        '-p',
        'tsconfig.build.json',
        '--outDir',
        join(app, 'dist'),
      ],
      { cwd: REPO, stdio: 'pipe' },
    );
    // The bundles resolve the packages they leave outside, as the image's node_modules holds them.
    symlinkSync(join(REPO, 'node_modules'), join(app, 'node_modules'));
    execFileSync(
      process.execPath,
      ['--import', 'tsx', join('scripts', 'bundle.ts'), join(app, 'dist')],
      { cwd: REPO, stdio: 'pipe' },
    );
    cpSync(join(REPO, 'package.json'), join(app, 'package.json'));
  }, 120_000);

  afterAll(() => {
    for (const child of children) if (child.exitCode === null) child.kill('SIGKILL');
    rmSync(app, { recursive: true, force: true });
  });

  it('has both entry points where the Dockerfile runs them', () => {
    for (const stage of ['broker', 'sidecar'])
      for (const file of entrypoint(stage).filter((a) => a.endsWith('.js')))
        expect(existsSync(join(app, file)), `${stage}: ${file}`).toBe(true);
    // Server reflection answers from the generated descriptors, not from .proto files.
    expect(existsSync(join(app, 'dist', 'gen', 'descriptor-files.js'))).toBe(true);
    expect(existsSync(join(app, 'dist', 'proto'))).toBe(false);
  });

  it('imports no package outside package.json dependencies (the image has no devDependencies)', () => {
    const builtins = new Set(builtinModules);
    const missing = new Set<string>();
    const walk = (dir: string): void => {
      for (const entry of readdirSync(dir, { withFileTypes: true })) {
        const path = join(dir, entry.name);
        if (entry.isDirectory()) walk(path);
        else if (entry.name.endsWith('.js')) {
          const text = readFileSync(path, 'utf8');
          for (const m of text.matchAll(
            /(?:^|\s)(?:import|export)\s[^'"]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)|^import\s+['"]([^'"]+)['"]/gm,
          )) {
            const spec = (m[1] ?? m[2] ?? m[3])!;
            if (spec.startsWith('.') || spec.startsWith('node:') || builtins.has(spec)) continue;
            const name = spec.startsWith('@')
              ? spec.split('/').slice(0, 2).join('/')
              : spec.split('/')[0]!;
            if (!(name in pkg.dependencies)) missing.add(`${relative(app, path)}: ${name}`);
          }
        }
      }
    };
    walk(join(app, 'dist'));
    expect([...missing]).toEqual([]);
  });

  it('starts the broker and the sidecar from it; the sidecar passes the chart exec probes', async () => {
    const brokerPort = await freePort();
    const metricsPort = await freePort();
    // The broker as the chart runs it with metrics on: the compiled telemetry entry, the
    // Prometheus endpoint, no traces exported.
    const broker = await startNode(
      app,
      entrypoint('broker').slice(1),
      {
        TB_GRPC_ADDRESS: `127.0.0.1:${brokerPort}`,
        TB_IDP_TOKEN_ENDPOINT: 'http://127.0.0.1:1/token',
        TB_IDP_CLIENT_ID: 'x',
        TB_IDP_CLIENT_SECRET: 'y',
        OTEL_TRACES_EXPORTER: 'none',
        OTEL_METRICS_EXPORTER: 'prometheus',
        OTEL_EXPORTER_PROMETHEUS_HOST: '127.0.0.1',
        OTEL_EXPORTER_PROMETHEUS_PORT: String(metricsPort),
        OTEL_LOGS_EXPORTER: 'none',
        // TLS and caller authentication on, as the chart runs it.
        ...devIdentity().brokerEnv(),
      },
      'broker serving',
    );
    children.push(broker.child);
    const scraped = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(scraped).toMatch(/^tb_broker_watchers\{[^}]*\} 0$/m);

    const sidecarPort = await freePort();
    const sidecar = await startNode(
      app,
      entrypoint('sidecar').slice(1),
      {
        TB_SIDECAR_BROKER_ADDRESS: `127.0.0.1:${brokerPort}`,
        TB_SIDECAR_PORT: String(sidecarPort),
        OTEL_SDK_DISABLED: 'true',
        ...devIdentity().sidecarEnv(),
      },
      'sidecar serving',
    );
    children.push(sidecar.child);

    const charts = HelmCharts.setUp();
    let objects: K8sObject[];
    try {
      objects = charts.render(charts.example, [], ['--set', `tokenBroker.port=${sidecarPort}`]);
    } finally {
      charts.tearDown();
    }
    const container = (
      find(objects, 'Deployment') as unknown as {
        spec: {
          template: {
            spec: { initContainers: Array<Record<string, { exec: { command: string[] } }>> };
          };
        };
      }
    ).spec.template.spec.initContainers[0]!;
    for (const probe of ['startupProbe', 'livenessProbe', 'readinessProbe']) {
      const [command, ...args] = container[probe]!.exec.command;
      expect(command).toBe('node');
      expect(probeStatus(args), probe).toBe(0);
    }

    // Graceful stop on SIGTERM, as a pod's termination sends it.
    sidecar.child.kill('SIGTERM');
    broker.child.kill('SIGTERM');
    expect(await sidecar.exited).toBe(0);
    expect(await broker.exited).toBe(0);
    // With the sidecar gone, the same probe fails: it really asked the server.
    const [, ...args] = container.livenessProbe!.exec.command;
    expect(probeStatus(args)).not.toBe(0);
  }, 60_000);

  it('runs the sidecar injection webhook from the broker image, as the chart starts it', async () => {
    const charts = HelmCharts.setUp();
    let objects: K8sObject[];
    try {
      objects = charts.render(charts.broker, ['minimal.yaml', 'webhook.yaml']);
    } finally {
      charts.tearDown();
    }
    const container = (
      find(objects, 'Deployment', 'token-broker-webhook') as unknown as {
        spec: { template: { spec: { containers: Array<{ image: string; command: string[] }> } } };
      }
    ).spec.template.spec.containers[0]!;
    // The broker's image (no stage of its own), its second entry point.
    const broker = find(objects, 'Deployment', 'token-broker') as unknown as {
      spec: { template: { spec: { containers: Array<{ image: string }> } } };
    };
    expect(container.image).toBe(broker.spec.template.spec.containers[0]!.image);
    expect(container.command[0]).toBe('node');
    expect(existsSync(join(app, container.command.at(-1)!))).toBe(true);

    const ca = await makeCa('image-webhook');
    const leaf = await makeLeaf(ca, { commonName: 'token-broker-webhook.token-broker.svc' });
    const settings = join(app, 'sidecar.json');
    const configMap = find(objects, 'ConfigMap', 'token-broker-webhook') as K8sObject & {
      data: Record<string, string>;
    };
    writeFileSync(settings, configMap.data['sidecar.json']!);
    const port = await freePort();
    const webhook = await startNode(
      app,
      container.command.slice(1),
      {
        TB_WEBHOOK_HOST: '127.0.0.1',
        TB_WEBHOOK_PORT: String(port),
        TB_WEBHOOK_TLS_CERT_FILE: leaf.certFile,
        TB_WEBHOOK_TLS_KEY_FILE: leaf.keyFile,
        TB_WEBHOOK_SIDECAR_FILE: settings,
        TB_WEBHOOK_NAMESPACE: 'token-broker',
      },
      'webhook serving',
    );
    children.push(webhook.child);
    const status = await new Promise<number>((resolve, reject) =>
      httpsGet(
        {
          host: '127.0.0.1',
          port,
          path: '/healthz',
          ca: ca.certPem,
          servername: 'token-broker-webhook.token-broker.svc',
        },
        (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        },
      ).on('error', reject),
    );
    expect(status).toBe(200);
    webhook.child.kill('SIGTERM');
    expect(await webhook.exited).toBe(0);
  }, 60_000);
});

function probeStatus(args: string[]): number {
  try {
    execFileSync(process.execPath, args, { stdio: 'ignore', timeout: 10_000 });
    return 0;
  } catch (err) {
    return (err as { status: number | null }).status ?? -1;
  }
}

async function startNode(
  cwd: string,
  args: string[],
  env: Record<string, string>,
  ready: string,
): Promise<{ child: ChildProcess; exited: Promise<number | null> }> {
  const script = args.at(-1)!;
  const child = spawn(process.execPath, args, {
    cwd,
    env: { PATH: process.env.PATH ?? '', NODE_ENV: 'production', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => resolve(code)),
  );
  let output = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${script} did not start: ${output}`)), 20_000);
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      if (output.includes(`"msg":"${ready}"`)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`${script} exited with ${code}: ${output}`));
    });
  });
  return { child, exited };
}
