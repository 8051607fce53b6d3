/**
 * In-process telemetry for tests: a tracer provider with an in-memory exporter, registered as the
 * global one, and the same auto-instrumentations as production. Import it before anything that
 * loads @grpc/grpc-js or ioredis:
 *
 *   import { telemetry } from '../harness/telemetry-capture.js';   // first import of the file
 *   telemetry.spans();                                            // every finished span
 *
 * Vitest loads packages through its own module runner, where the ESM loader hook of
 * shared/telemetry/register.ts cannot see them; so the packages are required once here and the
 * require hooks patch them in place (production processes use the ESM hook; a process test
 * covers that path).
 */
import { createRequire } from 'node:module';
import { context, trace } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import {
  InMemorySpanExporter,
  SimpleSpanProcessor,
  TracerProvider,
  type ReadableSpan,
} from '@opentelemetry/sdk-trace';
import { createInstrumentations } from '../../shared/telemetry/instrumentations.js';

function start() {
  const exporter = new InMemorySpanExporter();
  const provider = new TracerProvider({ spanProcessors: [new SimpleSpanProcessor({ exporter })] });
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  trace.setGlobalTracerProvider(provider);
  const instrumentations = createInstrumentations({ redis: true, http: true });
  const require = createRequire(import.meta.url);
  require('ioredis');
  require('@grpc/grpc-js');
  return {
    spans: (): ReadableSpan[] => exporter.getFinishedSpans(),
    reset: () => exporter.reset(),
    async shutdown(): Promise<void> {
      for (const instrumentation of instrumentations) instrumentation.disable();
      await provider.shutdown();
    },
  };
}

export const telemetry = start();

/** The span's parent span id, if it has a parent. */
export function parentOf(span: ReadableSpan): string | undefined {
  return span.parentSpanContext?.spanId;
}
