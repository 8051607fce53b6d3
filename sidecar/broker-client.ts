import * as grpc from '@grpc/grpc-js';
import {
  TokenBrokerServiceClient,
  type GetTokenRequest,
  type GetTokenResponse,
  type RefreshRequest,
  type RefreshResponse,
} from '../gen/tokenbroker/v1/token_broker.js';
import { clientTransport } from '../shared/grpc-client-credentials.js';
import type { TlsLog } from '../shared/watched-tls-files.js';
import type { BrokerApi } from './broker-link.js';
import type { SidecarConfig } from './config.js';

export interface BrokerClientOptions {
  address: string;
  keepaliveMs: number;
  reconnectMaxMs: number;
  tls: SidecarConfig['brokerTls'];
  tokenFile: string | undefined;
}

/**
 * The gRPC edge. round_robin keeps a connection to every address the target resolves to, so when
 * one replica dies the next Watch call goes to one that is already connected. Keepalive pings
 * notice a silent (frozen, unplugged) peer within keepalive + its timeout: 5 s by default.
 */
export function connectBroker(options: BrokerClientOptions, log?: TlsLog): BrokerApi {
  const transport = clientTransport(
    {
      tls: options.tls,
      tokenFile: options.tokenFile,
      settingNames: { caFile: 'TB_SIDECAR_BROKER_CA_FILE', tokenFile: 'TB_SIDECAR_TOKEN_FILE' },
    },
    log,
  );
  const client = new TokenBrokerServiceClient(options.address, transport.credentials, {
    ...transport.options,
    interceptors: transport.interceptors,
    'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
    'grpc.service_config_disable_resolution': 1,
    'grpc.keepalive_time_ms': options.keepaliveMs,
    'grpc.keepalive_timeout_ms': keepaliveTimeoutMs(options.keepaliveMs),
    'grpc.keepalive_permit_without_calls': 1,
    'grpc.initial_reconnect_backoff_ms': Math.min(200, options.reconnectMaxMs),
    'grpc.max_reconnect_backoff_ms': options.reconnectMaxMs,
    // Replicas come and go in a rolling deploy: look their addresses up again soon.
    'grpc.dns_min_time_between_resolutions_ms': 5_000,
  });
  return {
    openWatch: () => client.watch(),
    refresh: (request: RefreshRequest, timeoutMs: number) =>
      new Promise<RefreshResponse>((resolve, reject) => {
        client.refresh(
          request,
          new grpc.Metadata(),
          { deadline: Date.now() + timeoutMs },
          (err, response) => (err ? reject(err) : resolve(response)),
        );
      }),
    getToken: (request: GetTokenRequest, timeoutMs: number) =>
      new Promise<GetTokenResponse>((resolve, reject) => {
        client.getToken(
          request,
          new grpc.Metadata(),
          { deadline: Date.now() + timeoutMs },
          (err, response) => (err ? reject(err) : resolve(response)),
        );
      }),
    channelReady: () =>
      client.getChannel().getConnectivityState(false) === grpc.connectivityState.READY,
    close: () => client.close(),
  };
}

/** How long a keepalive ping may go unanswered: half the interval, but 2 s at least on a busy node. */
function keepaliveTimeoutMs(keepaliveMs: number): number {
  return Math.max(2_000, Math.round(keepaliveMs / 2));
}
