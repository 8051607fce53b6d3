/**
 * Reads the V8 heap of a process started with `--inspect=127.0.0.1:<port>` (see `inspectFlag`),
 * through the inspector protocol, after forcing a full GC there: what the process really keeps,
 * not garbage that has not been collected yet. Nothing in the measured process changes; the
 * inspector only listens on 127.0.0.1.
 */
import { freePort } from '../../scripts/dev/free-port.js';

export interface HeapFigures {
  /** V8 heap in use after the GC (bytes). */
  used: number;
  /** V8 heap reserved (bytes). */
  total: number;
}

export async function inspectFlag(): Promise<{ flag: string; port: number }> {
  const port = await freePort();
  return { flag: `--inspect=127.0.0.1:${port}`, port };
}

/** One connection to the inspector; `gcAndMeasure` may be called repeatedly. */
export class HeapProbe {
  private nextId = 1;
  private readonly pending = new Map<number, (result: unknown) => void>();

  private constructor(private readonly socket: WebSocket) {
    socket.addEventListener('message', (event) => {
      const message = JSON.parse(String(event.data)) as { id?: number; result?: unknown };
      if (message.id !== undefined) this.pending.get(message.id)?.(message.result);
    });
  }

  static async connect(port: number): Promise<HeapProbe> {
    const targets = (await (await fetch(`http://127.0.0.1:${port}/json/list`)).json()) as {
      webSocketDebuggerUrl: string;
    }[];
    const socket = new WebSocket(targets[0]!.webSocketDebuggerUrl);
    await new Promise<void>((resolve, reject) => {
      socket.addEventListener('open', () => resolve(), { once: true });
      socket.addEventListener('error', () => reject(new Error('inspector connection failed')), {
        once: true,
      });
    });
    return new HeapProbe(socket);
  }

  private call<T>(method: string): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve) => {
      this.pending.set(id, (result) => {
        this.pending.delete(id);
        resolve(result as T);
      });
      this.socket.send(JSON.stringify({ id, method }));
    });
  }

  /** Two full GCs (the second collects what finalizers of the first let go), then the heap. */
  async gcAndMeasure(): Promise<HeapFigures> {
    await this.call('HeapProfiler.collectGarbage');
    await this.call('HeapProfiler.collectGarbage');
    const usage = await this.call<{ usedSize: number; totalSize: number }>('Runtime.getHeapUsage');
    return { used: usage.usedSize, total: usage.totalSize };
  }

  close(): void {
    this.socket.close();
  }
}
