/**
 * The auto-instrumentations both processes load. Constructing them enables them, which tells the
 * ESM loader hook which packages to wrap: register.ts does so before anything imports those.
 *
 * Nothing they record may carry a token or a user id: Redis statements are reduced to the command
 * name (keys name the user). Redis commands and outgoing HTTP requests get spans only when asked
 * (TB_TRACE_CLIENT_SPANS, telemetry-settings.ts): they would cost more than the rotations.
 * Incoming HTTP gets no server spans: the only servers are the sidecar's API, whose token reads
 * have our own `sidecar.read` span (the URL names the user), and metrics scrapes. (Ignoring
 * requests one by one would not do: the instrumentation suppresses tracing inside an ignored
 * request, our own span included.)
 */
import type { Instrumentation } from '@opentelemetry/instrumentation';
import type { ClientSpans } from './telemetry-settings.js';
import { GrpcInstrumentation } from '@opentelemetry/instrumentation-grpc';
import { HttpInstrumentation } from '@opentelemetry/instrumentation-http';
import { IORedisInstrumentation } from '@opentelemetry/instrumentation-ioredis';
import { UndiciInstrumentation } from '@opentelemetry/instrumentation-undici';

export function createInstrumentations(clientSpans: ClientSpans): Instrumentation[] {
  return [
    // Health checks every few seconds would drown the traces.
    new GrpcInstrumentation({ ignoreGrpcMethods: ['Check'] }),
    // Only inside a rotation or a request (the default): idle polling makes no traces.
    ...(clientSpans.redis
      ? [new IORedisInstrumentation({ dbStatementSerializer: (command) => command })]
      : []),
    ...(clientSpans.http
      ? [
          new HttpInstrumentation({ disableIncomingRequestInstrumentation: true }),
          new UndiciInstrumentation(),
        ]
      : []),
  ];
}
