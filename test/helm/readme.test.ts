/**
 * README.md's "Install with Helm" section documents every value of both charts, with the default
 * the chart really has, and nothing that is not a value.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { ANNOTATIONS } from '../../webhook/annotations.js';
import { REPO } from './helm-harness.js';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
interface SchemaNode {
  properties?: Record<string, SchemaNode>;
}

// Free-form maps: their keys are the user's, not the chart's.
const FREE_FORM = new Set([
  'resources',
  'podLabels',
  'sidecarPodLabels',
  'namespaceSelector',
  'objectSelector',
  // webhook.sidecar: the tokenBroker.* keys, documented in the library's table.
  'sidecar',
]);

/** Paths of the values a user sets: scalars, lists, empty or free-form maps. */
function leaves(value: Json, prefix = ''): Map<string, Json> {
  const out = new Map<string, Json>();
  const isMap = value !== null && typeof value === 'object' && !Array.isArray(value);
  const name = prefix.split('.').at(-1)!;
  if (isMap && Object.keys(value).length > 0 && !FREE_FORM.has(name)) {
    for (const [key, item] of Object.entries(value))
      for (const [path, leaf] of leaves(item, prefix ? `${prefix}.${key}` : key))
        out.set(path, leaf);
  } else out.set(prefix, value);
  return out;
}

function schemaLeaves(node: SchemaNode, prefix = ''): string[] {
  if (!node.properties || FREE_FORM.has(prefix.split('.').at(-1)!)) return [prefix];
  return Object.entries(node.properties).flatMap(([key, child]) =>
    schemaLeaves(child, prefix ? `${prefix}.${key}` : key),
  );
}

const readme = readFileSync(join(REPO, 'README.md'), 'utf8');
const section = /^## Install with Helm$([^]*?)^## /m.exec(readme)?.[1] ?? '';

/** Rows of the section's tables: key, and the default cell's text. */
function documented(): Map<string, string> {
  const rows = new Map<string, string>();
  for (const line of section.split('\n')) {
    const cells = line.split('|').map((c) => c.trim());
    const key = /^`([A-Za-z0-9.]+)`$/.exec(cells[1] ?? '')?.[1];
    if (key) rows.set(key, cells[2]!);
  }
  return rows;
}

function expectDefaults(values: Map<string, Json>, rows: Map<string, string>, prefix: string) {
  for (const [path, value] of values) {
    const cell = rows.get(prefix + path);
    expect(cell, `README documents ${prefix}${path}`).toBeDefined();
    const code = /^`(.*)`$/.exec(cell!)?.[1];
    expect(code, `default of ${prefix}${path} in backticks, got ${cell}`).toBeDefined();
    expect(parse(code!) as Json, `default of ${prefix}${path}`).toEqual(value);
  }
}

describe('README "Install with Helm"', () => {
  it('comes after "Operating notes"', () => {
    const headings = [...readme.matchAll(/^## (.+)$/gm)].map((m) => m[1]);
    expect(headings.indexOf('Install with Helm')).toBeGreaterThan(
      headings.indexOf('Operating notes'),
    );
    expect(headings.indexOf('Operating notes')).toBeGreaterThan(-1);
  });

  it('documents every value of the token-broker chart, with its default', () => {
    const chart = join(REPO, 'deploy', 'helm', 'token-broker');
    const values = leaves(parse(readFileSync(join(chart, 'values.yaml'), 'utf8')) as Json);
    const schema = JSON.parse(
      readFileSync(join(chart, 'values.schema.json'), 'utf8'),
    ) as SchemaNode;
    const inSchema = schemaLeaves(schema).filter((p) => p !== 'global');
    const rows = documented();
    // The schema knows every value (values.yaml included), and README knows every one of those.
    expect(inSchema).toEqual(expect.arrayContaining([...values.keys()]));
    for (const path of inSchema) expect(rows.has(path), `README documents ${path}`).toBe(true);
    expectDefaults(values, rows, '');
    // Values with no default are the required ones, and say so.
    for (const path of inSchema.filter((p) => !values.has(p)))
      expect(rows.get(path), path).toMatch(/^\(required/);
    const stale = [...rows.keys()].filter(
      (k) => !k.startsWith('tokenBroker.') && !inSchema.includes(k),
    );
    expect(stale, 'README rows that are no value').toEqual([]);
  });

  it('documents every tokenBroker value of the sidecar library, with its default', () => {
    const template = readFileSync(
      join(REPO, 'deploy', 'helm', 'token-broker-sidecar', 'templates', '_sidecar.tpl'),
      'utf8',
    );
    const block = /define "token-broker-sidecar\.defaults" -}}\n([^]*?)\{\{- end }}/.exec(
      template,
    )?.[1];
    expect(block).toBeDefined();
    const values = leaves(parse(block!) as Json);
    expect(values.size).toBeGreaterThan(10);
    const rows = documented();
    const required = new Set(['brokerAddress']);
    expectDefaults(
      new Map([...values].filter(([path]) => !required.has(path))),
      rows,
      'tokenBroker.',
    );
    for (const path of required) expect(rows.get(`tokenBroker.${path}`)).toMatch(/^\(required/);
    const stale = [...rows.keys()]
      .filter((k) => k.startsWith('tokenBroker.'))
      .filter((k) => !values.has(k.slice('tokenBroker.'.length)));
    expect(stale, 'README rows that are no value').toEqual([]);
  });

  it('shows the annotation path first, the library chart after it', () => {
    const annotation = section.indexOf("token-broker.io/inject: 'true'");
    const library = section.indexOf('include "token-broker-sidecar.initContainers"');
    expect(annotation).toBeGreaterThan(-1);
    expect(library).toBeGreaterThan(annotation);
    // Every annotation the webhook reads has a row.
    for (const name of Object.values(ANNOTATIONS))
      expect(section, name).toMatch(new RegExp(`^\\| \`${name}\` +\\|`, 'm'));
  });

  it('sets only variables the broker reads (broker/config.ts)', () => {
    const config = readFileSync(join(REPO, 'broker', 'config.ts'), 'utf8');
    const known = new Set([...config.matchAll(/'(TB_[A-Z0-9_]+)'/g)].map((m) => m[1]));
    const templates = ['configmap.yaml', 'broker-deployment.yaml']
      .map((file) =>
        readFileSync(join(REPO, 'deploy', 'helm', 'token-broker', 'templates', file), 'utf8'),
      )
      .join('\n');
    const used = new Set([...templates.matchAll(/\b(TB_[A-Z0-9_]+)\b/g)].map((m) => m[1]!));
    expect(used.size).toBeGreaterThan(10);
    expect([...used].filter((name) => !known.has(name))).toEqual([]);
  });
});
