/**
 * Sealing cost per state record: the broker's Sealer (synchronous node:crypto AES-256-GCM, compact
 * JWE) beside jose's CompactEncrypt / compactDecrypt (WebCrypto) sealing and opening the same
 * 409-byte record with the same key and header, in the same run. In-process on purpose: this is a
 * CPU micro-benchmark of one function (no network, no other process), so it times the calls here.
 * Prints figures; never passes or fails on them.
 *
 *   make bench BENCH=sealing   (BENCH_ROUNDS, default 5, of BENCH_SEAL_OPS, default 5000, per side)
 *
 * Rounds alternate broker, jose, broker, jose..., so drift hits both alike; each figure is the
 * median round. The record is a SessionRecord-shaped object (token values are random filler).
 */
import { createHash, randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';

import { CompactEncrypt, compactDecrypt } from 'jose';

import { printTable } from './lib/report.js';
import { Sealer, generateSealingKey } from '../broker/sealing.js';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const OPS = Number(process.env.BENCH_SEAL_OPS ?? 5_000);
const RECORD_BYTES = 409;
const AAD = 'diku:bench-user';

/** A record whose JSON is exactly RECORD_BYTES long. */
function recordOf(bytes: number): Record<string, unknown> {
  const record = {
    tenant: 'diku',
    user: 'bench-user',
    accessToken: '',
    refreshToken: randomBytes(48).toString('base64url'),
    accessTokenExpiresAt: 1_800_000_000_000,
    generation: 7,
    familyId: randomBytes(12).toString('base64url'),
    updatedAt: 1_800_000_000_000,
  };
  const filler = bytes - JSON.stringify(record).length;
  record.accessToken = randomBytes(bytes).toString('base64url').slice(0, filler);
  return record;
}

const key = generateSealingKey('bench');
const sealer = new Sealer([key]);
const record = recordOf(RECORD_BYTES);
if (JSON.stringify(record).length !== RECORD_BYTES) throw new Error('record size is off');
const header = {
  alg: 'dir',
  enc: 'A256GCM',
  kid: key.kid,
  sid: createHash('sha256').update(AAD, 'utf8').digest('base64url'),
};
const joseOptions = { keyManagementAlgorithms: ['dir'], contentEncryptionAlgorithms: ['A256GCM'] };

const sides = {
  broker: {
    seal: () => sealer.seal(record, AAD),
    open: (jwe: string) => sealer.open(jwe, AAD),
  },
  jose: {
    seal: () =>
      new CompactEncrypt(new TextEncoder().encode(JSON.stringify(record)))
        .setProtectedHeader(header)
        .encrypt(key.key),
    open: async (jwe: string) =>
      JSON.parse(
        new TextDecoder().decode((await compactDecrypt(jwe, key.key, joseOptions)).plaintext),
      ) as unknown,
  },
};

/** Microseconds per call of `run` over OPS sequential awaited calls. */
async function time(run: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  for (let i = 0; i < OPS; i++) await run();
  return ((performance.now() - start) * 1_000) / OPS;
}

const sealedByBroker = await sides.broker.seal();
const sealedByJose = await sides.jose.seal();
// Each side opens what the other sealed: the same format both ways.
await sides.broker.open(sealedByJose);
await sides.jose.open(sealedByBroker);

const figures = {
  broker: { seal: [] as number[], open: [] as number[] },
  jose: { seal: [] as number[], open: [] as number[] },
};
// One warm-up round each, not counted.
for (let round = 0; round <= ROUNDS; round++) {
  for (const name of ['broker', 'jose'] as const) {
    const side = sides[name];
    const jwe = name === 'broker' ? sealedByBroker : sealedByJose;
    const seal = await time(side.seal);
    const open = await time(() => side.open(jwe));
    if (round > 0) {
      figures[name].seal.push(seal);
      figures[name].open.push(open);
    }
  }
}
const median = (values: number[]) =>
  [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
const usOne = (us: number) => `${us.toFixed(1)} us`;
const rows = (['seal', 'open'] as const).map((op) => {
  const broker = median(figures.broker[op]);
  const jose = median(figures.jose[op]);
  return {
    what: `${op} one ${RECORD_BYTES}-byte record (median of ${ROUNDS} x ${OPS})`,
    value: usOne(broker),
    baseline: `jose ${usOne(jose)}`,
    ratio: broker / jose,
  };
});
printTable('Sealing a state record: broker (node:crypto) vs jose (WebCrypto), in-process', [
  ...rows,
  {
    what: 'sealed record length',
    value: `${sealedByBroker.length} chars`,
    baseline: `jose ${sealedByJose.length} chars`,
    ratio: sealedByBroker.length / sealedByJose.length,
  },
]);
