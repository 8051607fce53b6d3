/**
 * Extracts named entries of a zip file into a folder, flat and executable: enough of unzip for
 * scripts/fetch-helm.sh, where neither unzip nor python3 can be assumed.
 * Usage: node --import tsx scripts/helm-unzip.ts <zip> <dir> <entry>...
 */
import { chmodSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { inflateRawSync } from 'node:zlib';

const [zipPath, outDir, ...wanted] = process.argv.slice(2);
if (!zipPath || !outDir || wanted.length === 0) {
  console.error('usage: helm-unzip.ts <zip> <dir> <entry>...');
  process.exit(2);
}

const zip = readFileSync(zipPath);
// The end-of-central-directory record sits in the last 64 KiB + 22 bytes.
const eocd = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
if (eocd < 0) throw new Error(`${zipPath}: not a zip file`);
const entries = zip.readUInt16LE(eocd + 10);
let at = zip.readUInt32LE(eocd + 16);
const found = new Set<string>();
for (let i = 0; i < entries; i++) {
  if (zip.readUInt32LE(at) !== 0x02014b50) throw new Error(`${zipPath}: bad central directory`);
  const method = zip.readUInt16LE(at + 10);
  const compressedSize = zip.readUInt32LE(at + 20);
  const size = zip.readUInt32LE(at + 24);
  const nameLength = zip.readUInt16LE(at + 28);
  const extraLength = zip.readUInt16LE(at + 30);
  const commentLength = zip.readUInt16LE(at + 32);
  const localHeader = zip.readUInt32LE(at + 42);
  const name = zip.toString('utf8', at + 46, at + 46 + nameLength);
  at += 46 + nameLength + extraLength + commentLength;
  if (!wanted.includes(name)) continue;

  const dataStart =
    localHeader + 30 + zip.readUInt16LE(localHeader + 26) + zip.readUInt16LE(localHeader + 28);
  const raw = zip.subarray(dataStart, dataStart + compressedSize);
  const data = method === 0 ? raw : method === 8 ? inflateRawSync(raw) : undefined;
  if (!data) throw new Error(`${name}: unsupported zip method ${method}`);
  if (data.length !== size) throw new Error(`${name}: size ${data.length}, expected ${size}`);
  const target = join(outDir, basename(name));
  // Write then rename, so an interrupted run never leaves a truncated binary behind.
  writeFileSync(`${target}.partial`, data);
  chmodSync(`${target}.partial`, 0o755);
  renameSync(`${target}.partial`, target);
  found.add(name);
}
const missing = wanted.filter((name) => !found.has(name));
if (missing.length > 0) throw new Error(`${zipPath}: no entries ${missing.join(', ')}`);
