import { brokerEnv, redisTopology } from './broker-env.js';
import { startBrokerProcess } from './broker-process.js';
import { startFastIdp } from './fast-idp.js';
import { startRedisNodes } from './redis-nodes.js';
import { performance } from 'node:perf_hooks';
const redis = await startRedisNodes(2);
const idp = await startFastIdp({ accessTtlSeconds: 60 });
const env = { ...brokerEnv(idp, redisTopology(redis.urls), {}), ...(process.env.CC ? { NODE_COMPILE_CACHE: process.env.CC } : {}) };
for (let i = 0; i < 7; i++) {
  const t = performance.now();
  const b = await startBrokerProcess(env, { compiled: true, nodeFlags: [] } as never);
  console.log('start', (performance.now() - t).toFixed(0), 'ms');
  const lines = (b as unknown as { logs: { msg: string; time?: number }[] }).logs;
  if (0) console.log(lines.map((l) => `${l.time ?? ''} ${l.msg}`).join('\n'));
  await b.stop();
}
await idp.stop(); await redis.stopAll();
