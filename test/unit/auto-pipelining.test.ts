import { Redis } from 'ioredis';
import { afterEach, describe, expect, it } from 'vitest';
import { autoPipeliningAllowed } from '../../broker/store/auto-pipelining.js';

const original = Redis.prototype.sendCommand;

describe('auto-pipelining of Redis commands', () => {
  afterEach(() => {
    Redis.prototype.sendCommand = original;
  });

  it('is allowed while no instrumentation traces each command', () => {
    expect(autoPipeliningAllowed()).toBe(true);
  });

  it('is off while the ioredis instrumentation wraps sendCommand (each span keeps its parent)', () => {
    // What the OpenTelemetry shimmer leaves on a wrapped method.
    const wrapped = function (this: Redis, ...args: Parameters<typeof original>) {
      return original.apply(this, args);
    };
    Object.defineProperty(wrapped, '__wrapped', { value: true });
    Redis.prototype.sendCommand = wrapped;
    expect(autoPipeliningAllowed()).toBe(false);
  });
});
