/**
 * Every atomic change of session state is one of these Lua scripts. Each touches the keys of one
 * shard only (one Redis Cluster slot, see keys.ts): the session's hash and its shard's due queue
 * and indexes; only the *_SHARDS scripts, run on a single Redis or a Sentinel master (never on a
 * Cluster), read every shard's due queue in one call. An event goes out only once the write is
 * acknowledged by the required replicas (RedisSessionStore.commit), so no watcher sees a
 * generation a failover could still lose: the commit script publishes itself only when the
 * store waits for no replica (then nothing is left to wait for), and never on a Cluster.
 */

/**
 * Commits a session transition: compare-and-set write, due-queue entry, indexes.
 * KEYS[1] session hash   KEYS[2] due   KEYS[3] index   KEYS[4] reauth   KEYS[5] dead
 * KEYS[6] family-end index
 * ARGV[1] expected generation ('' = the session must not exist)
 * ARGV[2] new generation   ARGV[3] sealed record   ARGV[4] now (epoch ms)
 * ARGV[5] session id   ARGV[6] due time ('' = leave the due queue)
 * ARGV[7] '1' if REAUTH_REQUIRED   ARGV[8] '1' if REVOKED, REAUTH_REQUIRED or IDLE
 * ARGV[9] when the family ends at the latest ('' = not counted: see familyEndOf)
 * ARGV[10] channel to PUBLISH ARGV[11] on once written ('' = publish nothing here)
 * Returns 1 when committed, 2 when this very write (same generation, same sealed bytes) is
 * already there (a retry after an unacknowledged write), 0 on a compare-and-set miss.
 */
export const COMMIT_SESSION = `
local current = redis.call('HGET', KEYS[1], 'gen')
local matches
if ARGV[1] == '' then matches = not current else matches = current == ARGV[1] end
if not matches then
  if current == ARGV[2] and redis.call('HGET', KEYS[1], 'sealed') == ARGV[3] then
    if ARGV[10] ~= '' then redis.call('PUBLISH', ARGV[10], ARGV[11]) end
    return 2
  end
  return 0
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'sealed', ARGV[3])
redis.call('HDEL', KEYS[1], 'inflight')
if not current then
  redis.call('HSET', KEYS[1], 'used', ARGV[4])
  redis.call('ZADD', KEYS[3], 0, ARGV[5])
end
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
end
if ARGV[7] == '1' then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
else
  redis.call('ZREM', KEYS[4], ARGV[5])
end
if ARGV[8] == '1' then
  redis.call('ZADD', KEYS[5], 'NX', ARGV[4], ARGV[5])
else
  redis.call('ZREM', KEYS[5], ARGV[5])
end
if ARGV[9] == '' then
  redis.call('ZREM', KEYS[6], ARGV[5])
else
  redis.call('ZADD', KEYS[6], ARGV[9], ARGV[5])
end
if ARGV[10] ~= '' then redis.call('PUBLISH', ARGV[10], ARGV[11]) end
return 1
`;

/**
 * Marks a refresh-token presentation in flight, unless another may still be, and (when asked)
 * puts the session back in the due queue at a later time in the same step, so a replica that
 * dies mid-call leaves it to be claimed again.
 * KEYS[1] session hash   KEYS[2] the shard's due sorted set
 * ARGV[1] generation the marker is for   ARGV[2] marker JSON   ARGV[3] now (epoch ms)
 * ARGV[4] session id   ARGV[5] due time once marked ('' = leave the due queue as it is)
 * Returns {1, tookOver (0|1)} when marked, {0, 0} when the generation moved,
 * {-1, deadline} while an earlier attempt may still be in flight.
 */
export const MARK_INFLIGHT = `
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return {0, 0} end
local earlier = redis.call('HGET', KEYS[1], 'inflight')
local tookOver = 0
if earlier then
  local marker = cjson.decode(earlier)
  if tostring(marker.generation) == ARGV[1] then
    if marker.deadline > tonumber(ARGV[3]) then return {-1, marker.deadline} end
    tookOver = 1
  end
end
redis.call('HSET', KEYS[1], 'inflight', ARGV[2])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4]) end
return {1, tookOver}
`;

/**
 * Records a use of an existing session (never creates one).
 * KEYS[1] session hash   ARGV[1] now (epoch ms)
 * Returns 1 when recorded, 0 when the session does not exist.
 */
export const TOUCH_SESSION = `
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
if tonumber(ARGV[1]) > used then redis.call('HSET', KEYS[1], 'used', ARGV[1]) end
return 1
`;

/**
 * Claims due sessions of one shard with a visibility lease: claimed entries move to the lease's
 * end, so a claimer that dies gives them back when the lease runs out.
 * KEYS[1] the shard's due sorted set
 * ARGV[1] now   ARGV[2] limit   ARGV[3] lease end (epoch ms)
 * Returns {id1, due1, id2, due2, ...}: each claimed session id and its score (due time) before
 * the claim.
 */
export const CLAIM_DUE = `
local claimed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #claimed, 2 do redis.call('ZADD', KEYS[1], ARGV[3], claimed[i]) end
return claimed
`;

/**
 * CLAIM_DUE over every shard at once (single Redis or Sentinel master only: the keys lie in
 * different Cluster slots), starting at a rotating shard so none is always served last.
 * KEYS[1..n] every shard's due sorted set, in shard order
 * ARGV[1] now   ARGV[2] limit   ARGV[3] lease end (epoch ms)   ARGV[4] first shard (0-based)
 * Returns {id1, due1, id2, due2, ...} as CLAIM_DUE does.
 */
export const CLAIM_DUE_SHARDS = `
local claimed = {}
local left = tonumber(ARGV[2])
for i = 0, #KEYS - 1 do
  if left <= 0 then break end
  local key = KEYS[(tonumber(ARGV[4]) + i) % #KEYS + 1]
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, left)
  for j = 1, #due, 2 do
    redis.call('ZADD', key, ARGV[3], due[j])
    claimed[#claimed + 1] = due[j]
    claimed[#claimed + 1] = due[j + 1]
    left = left - 1
  end
end
return claimed
`;

/**
 * The earliest due time over every shard (single Redis or Sentinel master only, as
 * CLAIM_DUE_SHARDS). KEYS[1..n] every shard's due sorted set.
 * Returns that score as a string, or false when every queue is empty.
 */
export const NEXT_DUE_SHARDS = `
local min = false
for i = 1, #KEYS do
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (not min or tonumber(first[2]) < tonumber(min)) then min = first[2] end
end
return min
`;

/**
 * Deletes sessions of one shard that have been dead (REVOKED, REAUTH_REQUIRED, IDLE) since before
 * the cutoff, with their index entries. The caller lists candidates first; each is checked again
 * here, so a session revived meanwhile (taken out of the dead set) stays. Idempotent: replicas may
 * sweep at once without a lock.
 * KEYS[1] dead   KEYS[2] due   KEYS[3] index   KEYS[4] reauth   KEYS[5..] session hashes
 * ARGV[1] cutoff (epoch ms)   ARGV[2..] session ids, in the order of KEYS[5..]
 * Returns how many sessions were deleted.
 */
export const SWEEP_DEAD = `
local deleted = 0
for i = 2, #ARGV do
  local since = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if since and tonumber(since) <= tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[i + 3])
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('ZREM', KEYS[3], ARGV[i])
    redis.call('ZREM', KEYS[4], ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
`;

/**
 * Moves one session from the legacy (unsharded) layout to its shard; single Redis only (the keys
 * are in different slots). When the new key exists already it wins and the old one is dropped.
 * KEYS[1] old hash   KEYS[2] old due   KEYS[3] old index   KEYS[4] old reauth
 * KEYS[5] new hash   KEYS[6] new due   KEYS[7] new index   KEYS[8] new reauth   KEYS[9] new dead
 * ARGV[1] session id   ARGV[2] '1' if the record is dead   ARGV[3] now (epoch ms)
 * Returns 1 when moved, 0 when there was nothing to move.
 */
export const MIGRATE_LEGACY = `
local moved = 0
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[5])
  local due = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if due then redis.call('ZADD', KEYS[6], due, ARGV[1]) end
  redis.call('ZADD', KEYS[7], 0, ARGV[1])
  local reauth = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if reauth then redis.call('ZADD', KEYS[8], reauth, ARGV[1]) end
  if ARGV[2] == '1' then redis.call('ZADD', KEYS[9], 'NX', reauth or ARGV[3], ARGV[1]) end
  moved = 1
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return moved
`;
