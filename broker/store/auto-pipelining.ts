import { Redis } from 'ioredis';

/**
 * Whether ioredis may auto-pipeline: send the commands of one tick in one socket write (a rotation
 * costs far fewer writes). Not while telemetry traces every Redis command (the ioredis
 * instrumentation wraps `sendCommand`): a batch is sent in the context of its first command, so
 * the other commands' spans would join that command's trace, another rotation's.
 */
export function autoPipeliningAllowed(): boolean {
  return (Redis.prototype.sendCommand as { __wrapped?: unknown }).__wrapped !== true;
}
