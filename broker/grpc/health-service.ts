import * as grpc from '@grpc/grpc-js';
import {
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthService,
  type HealthCheckRequest,
  type HealthCheckResponse,
  type HealthServer,
} from '../../gen/grpc/health/v1/health.js';

type Watcher = (status: ServingStatus) => void;

/**
 * The standard health service (grpc.health.v1: Check, Watch, List) over a fixed set of service
 * names, "" being the server as a whole. Kubernetes' gRPC probes ask Check; Watch sends the
 * status now and then each change. Built from proto/grpc/health, so serving it loads no .proto
 * file at start.
 */
export class HealthStatus {
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly watchers = new Map<string, Set<Watcher>>();

  /** Every service starts NOT_SERVING. */
  constructor(services: readonly string[]) {
    for (const service of services) this.statuses.set(service, ServingStatus.NOT_SERVING);
  }

  /** Sets one known service's status; watchers hear only a change. */
  set(service: string, serving: boolean): void {
    const status = serving ? ServingStatus.SERVING : ServingStatus.NOT_SERVING;
    if (!this.statuses.has(service)) throw new Error(`unknown health service "${service}"`);
    if (this.statuses.get(service) === status) return;
    this.statuses.set(service, status);
    for (const watcher of this.watchers.get(service) ?? []) watcher(status);
  }

  addToServer(server: grpc.Server): void {
    server.addService(HealthService, this.implementation());
  }

  private implementation(): HealthServer {
    return {
      check: (call, callback) => {
        const status = this.statuses.get(call.request.service);
        if (status === undefined) {
          callback({
            code: grpc.status.NOT_FOUND,
            details: `no health status for service "${call.request.service}"`,
          });
          return;
        }
        callback(null, { status });
      },
      watch: (call) => this.watch(call),
      list: (_call, callback) => {
        const statuses: Record<string, HealthCheckResponse> = {};
        for (const [service, status] of this.statuses) statuses[service] = { status };
        callback(null, { statuses });
      },
    };
  }

  private watch(call: grpc.ServerWritableStream<HealthCheckRequest, HealthCheckResponse>): void {
    const service = call.request.service;
    const watcher: Watcher = (status) => call.write({ status });
    let set = this.watchers.get(service);
    if (!set) this.watchers.set(service, (set = new Set()));
    set.add(watcher);
    const done = () => {
      set.delete(watcher);
      if (set.size === 0 && this.watchers.get(service) === set) this.watchers.delete(service);
    };
    call.on('cancelled', done);
    call.on('close', done);
    call.on('error', done);
    // An unknown service is not an error for Watch: it may become known (not on this server).
    call.write({ status: this.statuses.get(service) ?? ServingStatus.SERVICE_UNKNOWN });
  }
}
