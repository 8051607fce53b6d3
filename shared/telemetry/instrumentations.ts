/**
 * The auto-instrumentations both processes load. Constructing them enables them, which tells the
 * ESM loader hook which packages to wrap: register.ts does so before anything imports those.
 *
 * Nothing they record may carry a token or a user id: Redis statements are reduced to the command
 * name (keys name the user), and the sidecar's incoming token reads are left to our own
 * `sidecar.read` span (the URL names the user).
 */
import type { Instrumentation } from '@opentelemetry/instrumentation';
import { GrpcInstrumentation } from '@opentelemetry/instrumentation-grpc';
import { HttpInstrumentation } from '@opentelemetry/instrumentation-http';
import { IORedisInstrumentation } from '@opentelemetry/instrumentation-ioredis';
import { UndiciInstrumentation } from '@opentelemetry/instrumentation-undici';

/** Paths of the sidecar's API that get no HTTP server span: token reads and probes. */
const UNTRACED_PATHS = /^\/(v1\/tokens\/|healthz|readyz|metrics)/;

export function createInstrumentations(): Instrumentation[] {
  return [
    // Health checks every few seconds would drown the traces.
    new GrpcInstrumentation({ ignoreGrpcMethods: ['Check'] }),
    // Only inside a rotation or a request (the default): idle polling makes no traces.
    new IORedisInstrumentation({ dbStatementSerializer: (command) => command }),
    new HttpInstrumentation({
      ignoreIncomingRequestHook: (request) => UNTRACED_PATHS.test(request.url ?? ''),
    }),
    new UndiciInstrumentation(),
  ];
}
