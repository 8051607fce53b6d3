/**
 * The broker against the FOLIO mod-login emulator (TB_IDP_TYPE=folio), real gRPC and real Redis:
 * system-user enrollment that survives the end of its token family by logging in again (and
 * stops at a wrong password), the dedicated refresh token's one rule, and gateway outages.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';
import { Redis } from 'ioredis';
import { pino, type Logger } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  SessionStatus,
  type EnrollRequest,
  type EnrollResponse,
} from '../../gen/tokenbroker/v1/token_broker.js';
import { BrokerClient, eventually, rpcError } from '../../scripts/dev/broker-client.js';
import { redisTopology, startInProcessBroker } from '../../scripts/dev/broker-env.js';
import {
  folioBrokerEnv,
  startFolioEmulator,
  type FolioEmulator,
} from '../harness/folio-emulator.js';
import { startRedisNodes, type RedisNodes } from '../../scripts/dev/redis-nodes.js';

const TENANT = 'diku';

let redis: RedisNodes;
const secretsDir = mkdtempSync(join(tmpdir(), 'tb-folio-secrets-'));

beforeAll(async () => {
  redis = await startRedisNodes(4);
});
afterAll(async () => {
  await redis?.stopAll();
  rmSync(secretsDir, { recursive: true, force: true });
});

function enroll(client: BrokerClient, request: EnrollRequest): Promise<EnrollResponse> {
  return new Promise((resolve, reject) =>
    client.raw.enroll(request, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

function loginRequest(
  user: string,
  secret: { $case: 'password' | 'passwordFile'; value: string },
): EnrollRequest {
  return {
    tenant: TENANT,
    user,
    idp: '',
    credential: { $case: 'login', value: { username: user, secret } },
  };
}

function capturingLogger(): { log: Logger; lines: string[] } {
  const lines: string[] = [];
  return { log: pino({ level: 'debug' }, { write: (line: string) => lines.push(line) }), lines };
}

/** Every key under `prefix` on a Redis node, with every value, as one text. */
async function dumpPrefix(url: string, prefix: string): Promise<string> {
  const client = new Redis(url);
  const parts: string[] = [];
  try {
    let cursor = '0';
    do {
      const [next, keys] = await client.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      cursor = next;
      for (const key of keys) {
        const type = await client.type(key);
        if (type === 'string') parts.push(key, (await client.get(key)) ?? '');
        else if (type === 'hash')
          parts.push(key, ...Object.entries(await client.hgetall(key)).flat());
        else if (type === 'zset') parts.push(key, ...(await client.zrange(key, '0', '-1')));
        else parts.push(key, type);
      }
    } while (cursor !== '0');
  } finally {
    client.disconnect();
  }
  return parts.join('\n');
}

describe('system-user enrollment (login-with-expiry)', () => {
  let folio: FolioEmulator;
  beforeAll(async () => {
    folio = await startFolioEmulator({ tokenExpiration: 'accessToken:2,refreshToken:60' });
  });
  afterAll(async () => {
    await folio?.close();
  });

  it('logs in again when the family ends, and stops at REAUTH_REQUIRED when the password is wrong', async () => {
    const user = 'data-import-system';
    folio.addUser(TENANT, user, 'pw-FAKE-first-0001');
    writeFileSync(join(secretsDir, user), 'pw-FAKE-first-0001\n');
    const { log, lines } = capturingLogger();
    const topology = redisTopology(redis.urls);
    const broker = await startInProcessBroker(
      folioBrokerEnv(folio, topology, { TB_SECRETS_DIR: secretsDir, TB_REFRESH_RATIO: '0.5' }),
      log,
    );
    const client = new BrokerClient(broker.address);
    const watcher = client.watch();
    const served = new Set<string>();
    try {
      const session = (
        await enroll(client, loginRequest(user, { $case: 'passwordFile', value: user }))
      ).session!;
      expect(session.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(session.generation).toBe(1);
      expect(session.idp).toBe('folio');
      expect(folio.counters.logins).toBe(1);
      expect(folio.familiesOf(TENANT, user)).toBe(1);

      watcher.subscribe(TENANT, user);
      const generation = () => watcher.latest(TENANT, user)?.generation ?? 0;
      await watcher.until(() => generation() >= 3, 8_000, 'two refreshes of the first family');
      expect(folio.counters.refreshes).toBeGreaterThanOrEqual(2);

      // The family ends (logout-all on the server): the next refresh is refused, and the
      // broker logs in again instead of giving up.
      const ended = generation();
      expect(folio.revokeUser(TENANT, user)).toBeGreaterThan(0);
      await eventually(() => folio.counters.logins === 2, 8_000, 'a second login');
      await watcher.until(() => generation() > ended + 1, 8_000, 'tokens of the new family');
      const latest = watcher.latest(TENANT, user)!;
      expect(latest.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(await folio.callProtected(TENANT, latest.accessToken)).toBe(200);
      expect(folio.familiesOf(TENANT, user)).toBe(2);
      expect(
        watcher.of(TENANT, user).every((e) => e.status === SessionStatus.SESSION_STATUS_ACTIVE),
      ).toBe(true);
      expect(folio.counters.reuses).toBe(0);
      for (const e of watcher.of(TENANT, user)) served.add(e.accessToken);

      // A wrong password: one refused login, then REAUTH_REQUIRED, and no loop.
      folio.setPassword(TENANT, user, 'pw-FAKE-second-0002');
      folio.revokeUser(TENANT, user);
      await watcher.until(
        () => watcher.latest(TENANT, user)?.status === SessionStatus.SESSION_STATUS_REAUTH_REQUIRED,
        8_000,
        'REAUTH_REQUIRED',
      );
      expect(watcher.latest(TENANT, user)!.errorCode).toBe('IDP_LOGIN_REJECTED');
      expect(watcher.latest(TENANT, user)!.accessToken).toBe('');
      const requests = { ...folio.counters };
      expect(requests.loginFailures).toBe(1);
      await sleep(2_000);
      expect(folio.counters.loginFailures).toBe(1);
      expect(folio.counters.logins).toBe(2);
      expect(folio.counters.refreshRequests).toBe(requests.refreshRequests);
      expect((await rpcError(client.getToken(TENANT, user))).code).toBe(
        grpc.status.FAILED_PRECONDITION,
      );

      // The operator fixes the secret and enrolls again: the file is read anew.
      writeFileSync(join(secretsDir, user), 'pw-FAKE-second-0002');
      const again = (
        await enroll(client, loginRequest(user, { $case: 'passwordFile', value: user }))
      ).session!;
      expect(again.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(folio.counters.logins).toBe(3);

      const text = lines.join('\n');
      expect(text.includes('pw-FAKE-first-0001') || text.includes('pw-FAKE-second-0002')).toBe(
        false,
      );
      expect([...served].some((token) => token !== '' && text.includes(token))).toBe(false);
      expect(text).toContain('logging in again with the enrolled login');
    } finally {
      watcher.close();
      client.close();
      await broker.stop();
    }
  });

  it('keeps an inline password sealed at rest and out of logs and metadata; checks password files', async () => {
    const password = 'pw-FAKE-inline-Hunter2-0003';
    folio.addUser(TENANT, 'sys-inline', password);
    const { log, lines } = capturingLogger();
    const topology = redisTopology(redis.urls);
    const broker = await startInProcessBroker(
      folioBrokerEnv(folio, topology, { TB_SECRETS_DIR: secretsDir }),
      log,
    );
    const client = new BrokerClient(broker.address);
    try {
      const session = (
        await enroll(client, loginRequest('sys-inline', { $case: 'password', value: password }))
      ).session!;
      expect(session.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      const stored = await dumpPrefix(topology.state, topology.prefix);
      expect(stored).toContain('sys-inline');
      expect(stored.includes(password)).toBe(false);
      expect(lines.join('\n').includes(password)).toBe(false);
      expect(JSON.stringify(await client.list(TENANT)).includes(password)).toBe(false);

      const beforeWrong = (await client.list(TENANT)).sessions.find((s) => s.user === 'sys-inline');
      const wrong = await rpcError(
        enroll(client, loginRequest('sys-inline', { $case: 'password', value: 'pw-FAKE-wrong' })),
      );
      // A refused login is the caller's bad argument (issue 12), and the session that worked
      // before is left as it was.
      expect(wrong.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(wrong.details).toMatch(
        /^login was refused by identity provider "folio" \(.*password\.incorrect/,
      );
      const afterWrong = (await client.list(TENANT)).sessions.find((s) => s.user === 'sys-inline');
      expect({ ...afterWrong, lastUsedAt: undefined }).toEqual({
        ...beforeWrong,
        lastUsedAt: undefined,
      });
      expect((await client.getToken(TENANT, 'sys-inline')).token!.generation).toBe(
        session.generation,
      );

      const escape = await rpcError(
        enroll(client, loginRequest('x', { $case: 'passwordFile', value: '../etc/passwd' })),
      );
      expect(escape.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(escape.details.startsWith('login.password_file ')).toBe(true);
      const missing = await rpcError(
        enroll(client, loginRequest('x', { $case: 'passwordFile', value: 'nobody' })),
      );
      expect(missing.code).toBe(grpc.status.INVALID_ARGUMENT);
      const noUser = await rpcError(
        enroll(client, { ...loginRequest('x', { $case: 'password', value: 'p' }), user: 'x' }),
      );
      expect(noUser.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect((await rpcError(client.getToken(TENANT, 'x'))).code).toBe(grpc.status.NOT_FOUND);
    } finally {
      client.close();
      await broker.stop();
    }
  });
});

describe('dedicated refresh token and gateway failures', () => {
  let folio: FolioEmulator;
  beforeAll(async () => {
    folio = await startFolioEmulator({ tokenExpiration: 'accessToken:4,refreshToken:60' });
  });
  afterAll(async () => {
    await folio?.close();
  });

  it('rotates a dedicated RT at once; the caller using its copy again is a reuse that logs the user out everywhere', async () => {
    folio.addUser(TENANT, 'jane', 'pw-FAKE-jane');
    const broker = await startInProcessBroker(folioBrokerEnv(folio, redisTopology(redis.urls)));
    const client = new BrokerClient(broker.address);
    const watcher = client.watch();
    try {
      const job = await folio.login(TENANT, 'jane', 'pw-FAKE-jane');
      const session = (await client.enroll(TENANT, 'jane', job.refreshToken)).session!;
      expect(session.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);
      expect(folio.refreshesInFamilyOf(job.refreshToken)).toBe(1);
      watcher.subscribe(TENANT, 'jane');

      // README: the caller must not use the enrolled RT again. Here it does.
      expect((await folio.refresh(TENANT, job.refreshToken)).status).toBe(422);
      expect(folio.counters.reuses).toBe(1);
      await watcher.until(
        () =>
          watcher.latest(TENANT, 'jane')?.status === SessionStatus.SESSION_STATUS_REAUTH_REQUIRED,
        8_000,
        'REAUTH_REQUIRED after the reuse',
      );
      expect(watcher.latest(TENANT, 'jane')!.errorCode).toBe('IDP_INVALID_GRANT');
    } finally {
      watcher.close();
      client.close();
      await broker.stop();
    }
  });

  it('rides out gateway 503s (Retry-After) and a refused connection on the current token', async () => {
    folio.addUser(TENANT, 'kim', 'pw-FAKE-kim');
    const broker = await startInProcessBroker(
      folioBrokerEnv(folio, redisTopology(redis.urls), { TB_REFRESH_RATIO: '0.5' }),
    );
    const client = new BrokerClient(broker.address);
    const watcher = client.watch();
    try {
      const job = await folio.login(TENANT, 'kim', 'pw-FAKE-kim');
      await client.enroll(TENANT, 'kim', job.refreshToken);
      watcher.subscribe(TENANT, 'kim');
      await watcher.until(() => watcher.of(TENANT, 'kim').length >= 1, 5_000, 'first state');
      const before = { ...folio.counters };
      const startGeneration = watcher.latest(TENANT, 'kim')!.generation;

      folio.setFault({ status: 503, retryAfterSeconds: 1, times: 2 });
      await eventually(
        () => folio.counters.faultsInjected - before.faultsInjected === 2,
        8_000,
        '2 faults',
      );
      await watcher.until(
        () => (watcher.latest(TENANT, 'kim')?.generation ?? 0) > startGeneration,
        8_000,
        'a rotation after the 503s',
      );
      expect(watcher.latest(TENANT, 'kim')!.status).toBe(SessionStatus.SESSION_STATUS_ACTIVE);

      await folio.stopListening();
      const during = watcher.latest(TENANT, 'kim')!;
      // The due refresh finds no gateway (connection refused: not presented) and is retried...
      await eventually(
        async () =>
          (await client.list(TENANT)).sessions.find((s) => s.user === 'kim')?.lastErrorCode ===
          'IDP_UNAVAILABLE',
        5_000,
        'a refused refresh',
      );
      // ...while the current, unexpired token is still served.
      const token = (await client.getToken(TENANT, 'kim')).token!;
      expect(token.generation).toBe(during.generation);
      expect(token.accessToken === during.accessToken).toBe(true);
      await folio.resumeListening();
      await watcher.until(
        () => (watcher.latest(TENANT, 'kim')?.generation ?? 0) > during.generation,
        8_000,
        'a rotation after the gateway came back',
      );
      expect(folio.counters.reuses - before.reuses).toBe(0);
      expect(folio.counters.refreshRejections).toBe(before.refreshRejections);
      expect(await folio.callProtected(TENANT, watcher.latest(TENANT, 'kim')!.accessToken)).toBe(
        200,
      );
    } finally {
      watcher.close();
      client.close();
      await broker.stop();
    }
  });
});
