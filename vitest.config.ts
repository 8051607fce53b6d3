import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Multi-process fault tests are heavy on a 2-core machine: keep files in one worker pool of 2.
    maxWorkers: 2,
    reporters: ['default'],
  },
});
