import type { IdpConfig } from '../config.js';
import { FolioAdapter } from './folio-adapter.js';
import type { IdpAdapter } from './idp-adapter.js';
import { OAuth2Adapter } from './oauth2-adapter.js';

/** The adapter for one configured IdP. */
export function createIdpAdapter(config: IdpConfig): IdpAdapter {
  if (config.type === 'folio') {
    return new FolioAdapter({
      name: config.name,
      baseUrl: config.folioUrl ?? '',
      timeoutMs: config.timeoutMs,
      answerWaitMs: config.answerWaitMs,
    });
  }
  return new OAuth2Adapter({
    name: config.name,
    issuer: config.issuer,
    tokenEndpoint: config.tokenEndpoint,
    revocationEndpoint: config.revocationEndpoint,
    introspectionEndpoint: config.introspectionEndpoint,
    clientId: config.clientId,
    clientSecret: config.clientSecret,
    authMethod: config.authMethod,
    scope: config.scope,
    exchangeTokenType: config.exchangeTokenType,
    timeoutMs: config.timeoutMs,
    answerWaitMs: config.answerWaitMs,
  });
}
