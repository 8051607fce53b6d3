import * as grpc from '@grpc/grpc-js';
import {
  TokenBrokerServiceClient,
  type RefreshRequest,
  type RefreshResponse,
} from '../gen/tokenbroker/v1/token_broker.js';
import type { BrokerApi } from './broker-link.js';

export interface BrokerClientOptions {
  address: string;
  keepaliveMs: number;
  reconnectMaxMs: number;
}

/**
 * The gRPC edge. round_robin keeps a connection to every address the target resolves to, so when
 * one replica dies the next Watch call goes to one that is already connected. Keepalive pings
 * notice a silent dead peer within keepalive + keepalive/2.
 */
export function connectBroker(options: BrokerClientOptions): BrokerApi {
  const client = new TokenBrokerServiceClient(options.address, grpc.credentials.createInsecure(), {
    'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
    'grpc.service_config_disable_resolution': 1,
    'grpc.keepalive_time_ms': options.keepaliveMs,
    'grpc.keepalive_timeout_ms': Math.round(options.keepaliveMs / 2),
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
    channelReady: () =>
      client.getChannel().getConnectivityState(false) === grpc.connectivityState.READY,
    close: () => client.close(),
  };
}
