import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { loadWebhookConfig } from '../../webhook/config.js';
import { mergeSettings } from '../../webhook/sidecar-settings.js';
import { DEFAULTS } from '../../webhook/sidecar-spec.js';

const REPO = join(import.meta.dirname, '..', '..');

describe('the webhook sidecar settings', () => {
  it("are the library chart's tokenBroker defaults, key for key", () => {
    const template = readFileSync(
      join(REPO, 'deploy', 'helm', 'token-broker-sidecar', 'templates', '_sidecar.tpl'),
      'utf8',
    );
    const block = /define "token-broker-sidecar\.defaults" -}}\n([^]*?)\{\{- end }}/.exec(
      template,
    )?.[1];
    expect(parse(block!)).toEqual(DEFAULTS);
  });

  it("are the keys the broker chart's schema allows in webhook.sidecar (brokerAddress is the chart's)", () => {
    interface Node {
      properties?: Record<string, Node>;
    }
    const schema = JSON.parse(
      readFileSync(join(REPO, 'deploy', 'helm', 'token-broker', 'values.schema.json'), 'utf8'),
    ) as Node;
    const sidecar = schema.properties!.webhook!.properties!.sidecar!;
    const { brokerAddress: _, ...rest } = DEFAULTS;
    expect(Object.keys(sidecar.properties!).sort()).toEqual(Object.keys(rest).sort());
    for (const group of ['image', 'serviceAccountToken', 'tls', 'telemetry'] as const)
      expect(Object.keys(sidecar.properties![group]!.properties!).sort(), group).toEqual(
        Object.keys(DEFAULTS[group]).sort(),
      );
  });

  it('merge over the defaults and refuse what is no setting, naming it', () => {
    const merged = mergeSettings(
      { brokerAddress: 'dns:///b:50051', tls: { serverName: 'b.svc' }, maxUsers: 5 },
      'file',
    );
    expect(merged.tls).toEqual({
      enabled: true,
      caConfigMap: 'token-broker-ca',
      serverName: 'b.svc',
    });
    expect(merged.maxUsers).toBe(5);
    expect(merged.image).toEqual(DEFAULTS.image);
    expect(() => mergeSettings({ brokerAddress: 'b:1', prot: 1 }, 'file')).toThrow(
      /^file: prot is not a sidecar setting/,
    );
    expect(() => mergeSettings({ brokerAddress: 'b:1', tls: { ca: 'x' } }, 'file')).toThrow(
      /file: tls\.ca is not a sidecar setting/,
    );
    expect(() => mergeSettings({ brokerAddress: 'b:1', port: '8181' }, 'file')).toThrow(
      /file: port must be a number, got string/,
    );
    expect(() => mergeSettings({}, 'file')).toThrow(/file: brokerAddress is required/);
    expect(() =>
      mergeSettings({ brokerAddress: 'b:1', env: { TB_SIDECAR_PORT: '1' } }, 'file'),
    ).toThrow(/env\.TB_SIDECAR_PORT has a settings key of its own/);
  });

  it('refuse an unknown TB_WEBHOOK_ variable and a settings file that is no JSON', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tb-webhook-unit-'));
    const bad = join(dir, 'bad.json');
    writeFileSync(bad, '{ nope');
    const env = {
      TB_WEBHOOK_TLS_CERT_FILE: '/c',
      TB_WEBHOOK_TLS_KEY_FILE: '/k',
      TB_WEBHOOK_NAMESPACE: 'token-broker',
      TB_WEBHOOK_SIDECAR_FILE: bad,
    };
    expect(() => loadWebhookConfig({ ...env, TB_WEBHOOK_PROT: '1' })).toThrow(
      /TB_WEBHOOK_PROT is not a webhook setting/,
    );
    expect(() => loadWebhookConfig(env)).toThrow(
      /TB_WEBHOOK_SIDECAR_FILE \(.*bad\.json\) is not valid JSON/,
    );
    expect(() => loadWebhookConfig({ ...env, TB_WEBHOOK_PORT: 'x' })).toThrow(/TB_WEBHOOK_PORT/);
  });
});
