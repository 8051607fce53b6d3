import { describe, expect, it } from 'vitest';
import { enrolled } from '../../broker/session-transitions.js';
import { MemorySessionStore } from '../../broker/store/memory-session-store.js';

const NOW = 1_700_000_000_000;
const ref = { tenant: 'diku', user: 'alice' };

function enrollment(login?: { username: string; password: string }) {
  return enrolled(
    ref,
    'default',
    { refreshToken: 'rt-1', login, enrolledBy: 'ns/sa' },
    undefined,
    { now: NOW, traceparent: '' },
    {
      tokens: { accessToken: 'at-1', tokenType: 'Bearer', accessExpiresAt: NOW + 60_000 },
      nextRefreshAt: NOW + 45_000,
    },
  );
}

describe('MemorySessionStore copies', () => {
  it('keeps what was committed, whatever the caller does to its record or to what it read', async () => {
    const store = new MemorySessionStore();
    const transition = enrollment({ username: 'svc', password: 'pw' });
    expect(await store.commit(transition, null, NOW)).toBe(true);
    const committed = structuredClone(transition.next);
    // The caller's objects change after the commit...
    transition.next.accessToken = 'changed';
    transition.next.login!.password = 'changed';
    const read = (await store.get(ref))!;
    expect(read.record).toStrictEqual(committed);
    // ...and so does what it read.
    read.record.generation = 99;
    read.record.login!.username = 'changed';
    await store.markInflight(
      ref,
      { generation: 1, deadline: NOW + 5_000, replica: 'r', attemptId: 'a' },
      NOW,
    );
    const marked = (await store.get(ref))!;
    marked.inflight!.deadline = 0;
    const again = (await store.get(ref))!;
    expect(again.record).toStrictEqual(committed);
    expect(again.inflight).toEqual({
      generation: 1,
      deadline: NOW + 5_000,
      replica: 'r',
      attemptId: 'a',
    });
    const listed = await store.list('diku', '', 10);
    listed.sessions[0]!.record.status = 'REVOKED';
    expect((await store.get(ref))!.record.status).toBe('ACTIVE');
  });

  it('keeps a record without a login or an enrolling caller as it was committed', async () => {
    const store = new MemorySessionStore();
    const transition = enrollment();
    delete transition.next.enrolledBy;
    await store.commit(transition, null, NOW);
    const read = (await store.get(ref))!.record;
    expect(read).toStrictEqual(structuredClone(transition.next));
    expect('enrolledBy' in read).toBe(false);
  });
});
