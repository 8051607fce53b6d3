import { createRequire } from 'node:module';
import type * as Http from 'node:http';
import type * as Https from 'node:https';

/*
 * node:http and node:https, loaded with require. On Node.js 22 an ES import of node:http builds
 * the module's ES facade, which reads every export, including the lazy WebSocket, CloseEvent and
 * MessageEvent getters that load Node's bundled undici: about 40 ms of every start for nothing
 * this project uses (bench/startup.ts). Import http and https from here; `import type` from
 * node:http is free.
 */
const load = createRequire(import.meta.url);

export const http = load('node:http') as typeof Http;
export const https = load('node:https') as typeof Https;
