/**
 * Bad values fail at install with a message that names the value: values.schema.json for types and
 * required values, a template check where the schema's message would echo a secret.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HelmCharts } from './helm-harness.js';

let charts: HelmCharts;
beforeAll(() => {
  charts = HelmCharts.setUp();
}, 120_000);
afterAll(() => charts?.tearDown());

const SCHEMA_FAILURE = "values don't meet the specifications of the schema(s)";

describe('values.schema.json', () => {
  it('accepts the least an install needs', () => {
    expect(charts.template(charts.broker, ['minimal.yaml']).ok).toBe(true);
  });

  it('refuses a value of the wrong type, naming it', () => {
    const result = charts.template(charts.broker, ['minimal.yaml', 'invalid-wrong-type.yaml']);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain(SCHEMA_FAILURE);
    expect(result.stderr).toContain("at '/replicaCount': got string, want integer");
  });

  it('refuses a missing required value, naming it', () => {
    const result = charts.template(charts.broker, ['missing-client-id.yaml']);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain(SCHEMA_FAILURE);
    expect(result.stderr).toContain("at '/idp': missing property 'clientId'");
  });

  it('needs the gateway URL for a FOLIO IdP, and no OAuth2 client', () => {
    const result = charts.template(charts.broker, ['missing-folio-url.yaml']);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain("at '/idp': missing property 'folioUrl'");
    expect(result.stderr).not.toContain('clientId');
    expect(charts.template(charts.broker, ['folio.yaml']).ok).toBe(true);
  });

  it('refuses an install with no values at all, naming what is missing', () => {
    const result = charts.template(charts.broker);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain("missing property 'clientId'");
    expect(result.stderr).toMatch(/missing property '(issuer|tokenEndpoint)'/);
    expect(result.stderr).toContain("missing property 'sealingKeys'");
    expect(result.stderr).toContain("missing property 'idpClientSecret'");
  });

  it('needs no client secret for authMethod none, nor any secret with existingSecret', () => {
    const none = charts.template(
      charts.broker,
      [],
      [
        '--set',
        'idp.tokenEndpoint=https://idp.example.com/token',
        '--set',
        'idp.clientId=tb',
        '--set',
        'idp.authMethod=none',
        '--set',
        'secrets.sealingKeys=k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=',
      ],
    );
    expect(none.stderr).toBe('');
    expect(none.stdout).not.toContain('idp-client-secret');
    const existing = charts.template(
      charts.broker,
      [],
      [
        '--set',
        'idp.issuer=https://idp.example.com',
        '--set',
        'idp.clientId=tb',
        '--set',
        'secrets.existingSecret=mine',
      ],
    );
    expect(existing.stderr).toBe('');
  });

  it('refuses a misspelt key instead of ignoring it', () => {
    const result = charts.template(charts.broker, ['minimal.yaml'], ['--set', 'replicaCont=5']);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain("additional properties 'replicaCont' not allowed");
  });

  it('refuses a broker.env entry that would override a variable the chart sets', () => {
    const result = charts.template(charts.broker, [
      'minimal.yaml',
      'invalid-chart-managed-env.yaml',
    ]);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain("invalid propertyName 'TB_REDIS_URL'");
  });

  it('refuses a ServiceMonitor without the metrics port', () => {
    const result = charts.template(charts.broker, [
      'minimal.yaml',
      'invalid-servicemonitor-without-metrics.yaml',
    ]);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain("at '/metrics/enabled': value must be true");
  });

  it('refuses external Redis without the state store URL', () => {
    const result = charts.template(charts.broker, [
      'minimal.yaml',
      'invalid-external-redis-without-url.yaml',
    ]);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain("at '/redis/external': missing property 'stateUrl'");
  });

  it('refuses a Redis password written into an external URL, saying where it goes instead', () => {
    const result = charts.template(charts.broker, [
      'minimal.yaml',
      'invalid-redis-password-in-url.yaml',
    ]);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain(
      'redis.external URLs must not carry $(TB_REDIS_PASSWORD): name the Secret in redis.external.passwordSecret',
    );
  });

  it('refuses a policy subject that is not namespace/serviceaccount, naming the rule', () => {
    const result = charts.template(charts.broker, ['minimal.yaml', 'invalid-policy-subject.yaml']);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain(
      "at '/authorization/rules/0/subjects/0': 'mod-data-import' does not match pattern",
    );
  });

  it('refuses a verb the broker does not know', () => {
    const result = charts.template(charts.broker, ['minimal.yaml', 'invalid-policy-verb.yaml']);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain(
      "at '/authorization/rules/0/verbs/1': value must be one of 'enroll', 'read', 'refresh', 'revoke', 'list'",
    );
  });

  it('refuses a rule without sessions, or with a session field it does not know', () => {
    const rule = { subjects: ['folio/mod-x'], verbs: ['read'] };
    const missing = charts.template(
      charts.broker,
      ['minimal.yaml'],
      ['--set-json', `authorization.rules=${JSON.stringify([rule])}`],
    );
    expect(missing.stderr).toContain("at '/authorization/rules/0': missing property 'sessions'");
    const typo = charts.template(
      charts.broker,
      ['minimal.yaml'],
      [
        '--set-json',
        `authorization.rules=${JSON.stringify([{ ...rule, sessions: [{ tenant: 'diku', usr: '*' }] }])}`,
      ],
    );
    expect(typo.stderr).toContain("additional properties 'usr' not allowed");
  });

  it('refuses two certificate sources, two JWKS sources, and namespaces listed two ways', () => {
    const tls = charts.template(charts.broker, ['minimal.yaml', 'invalid-tls-two-sources.yaml']);
    expect(tls.ok).toBe(false);
    expect(tls.stderr).toContain("at '/tls/existingSecret': value must be ''");
    const jwks = charts.template(
      charts.broker,
      ['minimal.yaml', 'auth-jwks.yaml'],
      ['--set', 'auth.jwksConfigMap=mine'],
    );
    expect(jwks.ok).toBe(false);
    expect(jwks.stderr).toContain("at '/auth/jwksConfigMap': value must be ''");
    const namespaces = charts.template(
      charts.broker,
      ['minimal.yaml', 'external-redis.yaml'],
      ['--set', 'networkPolicy.sidecarNamespaces={folio}'],
    );
    expect(namespaces.ok).toBe(false);
    expect(namespaces.stderr).toContain("at '/networkPolicy/sidecarNamespaceSelector'");
  });

  it('refuses a CA bundle that is no PEM certificate, and a JWKS file that is no JWKS', () => {
    const ca = charts.template(
      charts.broker,
      ['minimal.yaml', 'tls-cert-manager.yaml'],
      ['--set', 'tls.caBundle=not-a-certificate'],
    );
    expect(ca.ok).toBe(false);
    expect(ca.stderr).toContain("at '/tls/caBundle'");
    const jwks = charts.template(charts.broker, ['minimal.yaml', 'invalid-jwks-file.yaml']);
    expect(jwks.ok).toBe(false);
    expect(jwks.stderr).toContain('auth.jwksFile must be a JWKS document');
  });

  it('refuses broker.env entries for the TLS, identity and policy settings', () => {
    for (const name of ['TB_TLS', 'TB_AUTH', 'TB_POLICY_FILE', 'TB_AUTH_ISSUER_TOKEN_FILE']) {
      const result = charts.template(
        charts.broker,
        ['minimal.yaml'],
        ['--set', `broker.env.${name}=off`],
      );
      expect(result.stderr, name).toContain(`invalid propertyName '${name}'`);
    }
  });

  it('refuses malformed sealing keys without echoing them', () => {
    const result = charts.template(charts.broker, ['minimal.yaml', 'invalid-sealing-keys.yaml']);
    expect(result.ok).toBe(false);
    expect(result.stderr).toContain(
      'secrets.sealingKeys must list kid:base64 entries of 32-byte keys',
    );
    expect(result.stderr).not.toContain('dG9vLXNob3J0');
  });
});
