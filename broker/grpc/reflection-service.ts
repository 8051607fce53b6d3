import * as grpc from '@grpc/grpc-js';
import type { DescriptorFile } from '../../gen/descriptor-files.js';
import {
  ServerReflectionService,
  type ServerReflectionRequest,
  type ServerReflectionResponse,
} from '../../gen/grpc/reflection/v1/reflection.js';

/**
 * v1alpha, which older tools still ask first, carries the very same messages as v1: only the
 * service's path differs.
 */
const V1ALPHA_SERVICE = {
  serverReflectionInfo: {
    ...ServerReflectionService.serverReflectionInfo,
    path: '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo',
  },
} as const;

type Answer = NonNullable<ServerReflectionResponse['messageResponse']>;

/**
 * gRPC server reflection (grpc.reflection.v1 and v1alpha) answered from the descriptors the build
 * generated (gen/descriptor-files.ts): nothing is parsed at start, and a lookup is a Map read.
 * Lists the services given; serves any file of the set by name or by a symbol it defines, with
 * the files it imports. The broker's proto defines no extensions, so extension lookups answer
 * NOT_FOUND.
 */
export class ReflectionService {
  private readonly byName = new Map<string, DescriptorFile>();
  private readonly bySymbol = new Map<string, DescriptorFile>();
  private readonly bytes = new Map<string, Buffer>();

  constructor(
    files: readonly DescriptorFile[],
    private readonly services: readonly string[],
  ) {
    for (const file of files) {
      this.byName.set(file.name, file);
      for (const symbol of file.symbols) this.bySymbol.set(symbol, file);
    }
    // Checked here, so a lookup never meets a gap: buf build includes every import.
    for (const file of files)
      for (const dependency of file.dependencies)
        if (!this.byName.has(dependency))
          throw new Error(
            `reflection: ${file.name} imports "${dependency}", which is not in the set`,
          );
    const defined = new Set(files.flatMap((file) => file.services));
    for (const service of services)
      if (!defined.has(service))
        throw new Error(`reflection: no descriptor defines service "${service}"`);
  }

  addToServer(server: grpc.Server): void {
    const implementation = { serverReflectionInfo: this.handle };
    server.addService(ServerReflectionService, implementation);
    server.addService(V1ALPHA_SERVICE, implementation);
  }

  /** One answer per request, in order, until the client ends its side. */
  private readonly handle = (
    call: grpc.ServerDuplexStream<ServerReflectionRequest, ServerReflectionResponse>,
  ): void => {
    call.on('data', (request: ServerReflectionRequest) => {
      call.write({
        validHost: request.host,
        originalRequest: request,
        messageResponse: this.answer(request),
      });
    });
    call.on('end', () => call.end());
    call.on('error', () => undefined);
  };

  /** The answer to one request. */
  answer(request: ServerReflectionRequest): Answer {
    const asked = request.messageRequest;
    switch (asked?.$case) {
      case 'listServices':
        return {
          $case: 'listServicesResponse',
          value: { service: this.services.map((name) => ({ name })) },
        };
      case 'fileByFilename':
        return this.files(this.byName.get(asked.value), `no file named "${asked.value}"`);
      case 'fileContainingSymbol':
        return this.files(
          this.bySymbol.get(withoutLeadingDot(asked.value)),
          `no symbol named "${asked.value}"`,
        );
      case 'fileContainingExtension':
        return notFound(
          `no extension ${asked.value.extensionNumber} of "${asked.value.containingType}"`,
        );
      case 'allExtensionNumbersOfType': {
        const name = withoutLeadingDot(asked.value);
        if (!this.bySymbol.has(name)) return notFound(`no message type named "${asked.value}"`);
        return {
          $case: 'allExtensionNumbersResponse',
          value: { baseTypeName: name, extensionNumber: [] },
        };
      }
      default:
        return {
          $case: 'errorResponse',
          value: { errorCode: grpc.status.INVALID_ARGUMENT, errorMessage: 'empty request' },
        };
    }
  }

  /** The file and every file it imports, transitively, each once. */
  private files(file: DescriptorFile | undefined, missing: string): Answer {
    if (!file) return notFound(missing);
    const seen = new Set<string>();
    const order: Buffer[] = [];
    const visit = (name: string) => {
      if (seen.has(name)) return;
      seen.add(name);
      const found = this.byName.get(name);
      if (!found) return; // the constructor checked every import
      order.push(this.encoded(found));
      for (const dependency of found.dependencies) visit(dependency);
    };
    visit(file.name);
    return { $case: 'fileDescriptorResponse', value: { fileDescriptorProto: order } };
  }

  private encoded(file: DescriptorFile): Buffer {
    let bytes = this.bytes.get(file.name);
    if (!bytes) this.bytes.set(file.name, (bytes = Buffer.from(file.descriptor, 'base64')));
    return bytes;
  }
}

/** Some clients send a fully-qualified name with a leading dot, as in a field's type_name. */
function withoutLeadingDot(name: string): string {
  return name.startsWith('.') ? name.slice(1) : name;
}

function notFound(message: string): Answer {
  return {
    $case: 'errorResponse',
    value: { errorCode: grpc.status.NOT_FOUND, errorMessage: message },
  };
}
