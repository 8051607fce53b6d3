/**
 * Replicated Redis shapes for integration tests, from the same redis-server binary as
 * redis-nodes.ts (no other software):
 *
 *   const s = await startRedisSentinel({ replicas: 2, sentinels: 3 });
 *   s.sentinelList;                 // '127.0.0.1:P1,127.0.0.1:P2,...' for TB_REDIS_SENTINELS
 *   const old = await s.masterPort(); await s.nodeByPort(old)!.kill();
 *   const promoted = await s.waitForNewMaster(old, 20_000);
 *
 *   const c = await startRedisCluster({ masters: 3 }); // one replica per master
 *   c.nodeList;                     // for TB_REDIS_CLUSTER_NODES
 *   await c.killMasterAndWaitForPromotion(20_000);
 *
 * Timings are short (down-after 1000 ms, cluster-node-timeout 1000 ms) so a failover takes a few
 * seconds. Every wait is bounded and says what it waited for.
 */
import { execFile } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { freePort } from '../../scripts/dev/free-port.js';
import { startRedisNodes, type RedisNode, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const run = promisify(execFile);

/** Opens a short-lived client, runs `fn`, closes it; errors (node down) are thrown. */
async function withClient<T>(port: number, fn: (client: Redis) => Promise<T>): Promise<T> {
  const client = new Redis({
    host: '127.0.0.1',
    port,
    lazyConnect: true,
    retryStrategy: () => null,
    maxRetriesPerRequest: 0,
    connectTimeout: 1_000,
    commandTimeout: 2_000,
  });
  client.on('error', () => {});
  try {
    await client.connect();
    return await fn(client);
  } finally {
    client.disconnect();
  }
}

async function until<T>(
  what: string,
  timeoutMs: number,
  probe: () => Promise<T | undefined>,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline)
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${what}: ${last instanceof Error ? last.message : 'condition not met'}`,
      );
    await sleep(100);
  }
}

/** Replicas a master reports online (ROLE). */
async function onlineReplicas(port: number): Promise<number> {
  return withClient(port, async (c) => {
    const role = (await c.call('ROLE')) as [string, number, [string, string, string][]];
    return role[0] === 'master' ? role[2].length : -1;
  });
}

export interface RedisSentinel {
  readonly masterName: string;
  /** Data nodes: the first started as master, the rest as its replicas. */
  readonly dataNodes: readonly RedisNode[];
  readonly sentinels: readonly RedisNode[];
  /** `host:port,...` of the sentinels (TB_REDIS_SENTINELS). */
  readonly sentinelList: string;
  nodeByPort(port: number): RedisNode | undefined;
  /** The master's port as the sentinels report it. */
  masterPort(): Promise<number>;
  /** Waits until the sentinels name a master other than `oldPort` that answers as master. */
  waitForNewMaster(oldPort: number, timeoutMs: number): Promise<number>;
  stopAll(): Promise<void>;
}

export async function startRedisSentinel(
  options: { replicas?: number; sentinels?: number; masterName?: string } = {},
): Promise<RedisSentinel> {
  const masterName = options.masterName ?? 'tbmaster';
  const started: RedisNodes[] = [];
  const stopAll = async () => {
    for (const group of started.reverse()) await group.stopAll();
  };
  try {
    // Debug commands on: the loss test blocks replicas with DEBUG SLEEP.
    const debug = ['--enable-debug-command', 'local'];
    const master = await startRedisNodes(1, () => debug);
    started.push(master);
    const masterPort = master.nodes[0]!.port;
    const replicas = await startRedisNodes(options.replicas ?? 2, () => [
      ...debug,
      '--replicaof',
      '127.0.0.1',
      String(masterPort),
    ]);
    started.push(replicas);
    const dataNodes = [...master.nodes, ...replicas.nodes];
    await until('replicas in sync', 10_000, async () =>
      (await onlineReplicas(masterPort)) === replicas.nodes.length ? true : undefined,
    );
    const sentinels = await startRedisNodes(options.sentinels ?? 3, async (_port, dir) => {
      const file = join(dir, 'sentinel.conf');
      await writeFile(
        file,
        [
          `sentinel monitor ${masterName} 127.0.0.1 ${masterPort} 2`,
          `sentinel down-after-milliseconds ${masterName} 1000`,
          `sentinel failover-timeout ${masterName} 3000`,
          `sentinel parallel-syncs ${masterName} 2`,
          '',
        ].join('\n'),
      );
      return [file, '--sentinel'];
    });
    started.push(sentinels);
    const ask = async (): Promise<number> => {
      for (const s of sentinels.nodes) {
        if (!s.running) continue;
        try {
          const addr = await withClient(
            s.port,
            (c) =>
              c.call('SENTINEL', 'get-master-addr-by-name', masterName) as Promise<
                [string, string]
              >,
          );
          if (addr) return Number(addr[1]);
        } catch {
          // Try the next sentinel.
        }
      }
      throw new Error('no sentinel answered');
    };
    // Each sentinel must know the others and the replicas before a failover can be agreed on.
    await until('sentinels to discover each other and the replicas', 15_000, async () => {
      for (const s of sentinels.nodes) {
        const info = (await withClient(s.port, (c) =>
          c.call('SENTINEL', 'master', masterName),
        )) as string[];
        const field = (name: string) => Number(info[info.indexOf(name) + 1]);
        if (field('num-other-sentinels') < sentinels.nodes.length - 1) return undefined;
        if (field('num-slaves') < replicas.nodes.length) return undefined;
      }
      return true;
    });
    return {
      masterName,
      dataNodes,
      sentinels: sentinels.nodes,
      sentinelList: sentinels.nodes.map((n) => `127.0.0.1:${n.port}`).join(','),
      nodeByPort: (port) => dataNodes.find((n) => n.port === port),
      masterPort: ask,
      waitForNewMaster: (oldPort, timeoutMs) =>
        until(`a master other than ${oldPort}`, timeoutMs, async () => {
          const port = await ask();
          if (port === oldPort) return undefined;
          const role = await withClient(port, (c) => c.call('ROLE') as Promise<[string]>);
          return role[0] === 'master' ? port : undefined;
        }),
      stopAll,
    };
  } catch (err) {
    await stopAll();
    throw err;
  }
}

export interface RedisClusterTopology {
  readonly nodes: readonly RedisNode[];
  /** `host:port,...` of every node (TB_REDIS_CLUSTER_NODES). */
  readonly nodeList: string;
  /** Ports of the nodes that are masters now. */
  masterPorts(): Promise<number[]>;
  /**
   * Kills (-9) the master serving `slotOfKey`'s slot (or the first master) and waits until its
   * replica took over the slots and the cluster is ok again. Returns the killed port and the
   * milliseconds the promotion took.
   */
  killMasterAndWaitForPromotion(
    timeoutMs: number,
  ): Promise<{ killedPort: number; promotedPort: number; promotionMs: number }>;
  /**
   * Restarts a killed node (same port, same cluster config) and waits until it rejoined as a
   * replica and every master has one again: what Kubernetes does with a lost pod.
   */
  restartAsReplica(port: number, timeoutMs: number): Promise<void>;
  stopAll(): Promise<void>;
}

export async function startRedisCluster(
  options: { masters?: number } = {},
): Promise<RedisClusterTopology> {
  const masters = options.masters ?? 3;
  // Each node keeps its bus port across a restart (its peers remember it).
  const busPorts = new Map<number, number>();
  const group = await startRedisNodes(masters * 2, async (port) => [
    '--cluster-enabled',
    'yes',
    '--cluster-config-file',
    'nodes.conf',
    '--cluster-node-timeout',
    '1000',
    '--cluster-replica-validity-factor',
    '0',
    // The bus port would be port + 10000, which may be taken or past 65535: pick a free one.
    '--cluster-port',
    String(busPorts.get(port) ?? busPorts.set(port, await freePort()).get(port)!),
  ]);
  const nodes = group.nodes;
  try {
    await run(
      'redis-cli',
      [
        '--cluster',
        'create',
        ...nodes.map((n) => `127.0.0.1:${n.port}`),
        '--cluster-replicas',
        '1',
        '--cluster-yes',
      ],
      { timeout: 30_000 },
    );
    const clusterOk = (port: number) =>
      withClient(port, async (c) =>
        /cluster_state:ok/.test(String(await c.call('CLUSTER', 'INFO'))) ? true : undefined,
      );
    const masterPorts = async () => {
      const ports: number[] = [];
      for (const n of nodes) {
        if (!n.running) continue;
        const role = await withClient(n.port, (c) => c.call('ROLE') as Promise<[string]>).catch(
          () => ['down'],
        );
        if (role[0] === 'master') ports.push(n.port);
      }
      return ports;
    };
    await until(
      'every node to see the cluster ok, each master with its replica',
      20_000,
      async () => {
        for (const n of nodes) if (!(await clusterOk(n.port))) return undefined;
        const ports = await masterPorts();
        if (ports.length !== masters) return undefined;
        for (const port of ports) if ((await onlineReplicas(port)) < 1) return undefined;
        return true;
      },
    );
    return {
      nodes,
      nodeList: nodes.map((n) => `127.0.0.1:${n.port}`).join(','),
      masterPorts,
      killMasterAndWaitForPromotion: async (timeoutMs) => {
        const before = await masterPorts();
        const killedPort = before[0]!;
        await nodes.find((n) => n.port === killedPort)!.kill();
        const killedAt = Date.now();
        const promotedPort = await until(
          'a replica promoted in the killed master’s place',
          timeoutMs,
          async () => {
            const now = await masterPorts();
            const promoted = now.find((p) => !before.includes(p));
            if (promoted === undefined) return undefined;
            for (const port of now) if (!(await clusterOk(port))) return undefined;
            return promoted;
          },
        );
        return { killedPort, promotedPort, promotionMs: Date.now() - killedAt };
      },
      restartAsReplica: async (port, timeoutMs) => {
        await nodes.find((n) => n.port === port)!.restart();
        await until(`node ${port} back as a replica`, timeoutMs, async () => {
          const ports = await masterPorts();
          if (ports.includes(port) || ports.length !== masters) return undefined;
          for (const p of ports) if ((await onlineReplicas(p)) < 1) return undefined;
          return true;
        });
      },
      stopAll: () => group.stopAll(),
    };
  } catch (err) {
    await group.stopAll();
    throw err;
  }
}
