/**
 * Every atomic change of session state is one of these Lua scripts. Each touches one session's
 * hash; COMMIT_SESSION also keeps the due queue and the two indexes in the same step, which under
 * Redis Cluster needs those keys in the session's slot (see keys.ts).
 */

/**
 * Commits a session transition: compare-and-set write, due-queue entry, indexes, then publish.
 * KEYS[1] session hash   KEYS[2] due sorted set   KEYS[3] session index   KEYS[4] reauth index
 * KEYS[5] family-end index
 * ARGV[1] expected generation ('' = the session must not exist)
 * ARGV[2] new generation   ARGV[3] sealed record   ARGV[4] now (epoch ms)
 * ARGV[5] events channel   ARGV[6] event payload (JSON, no token values)
 * ARGV[7] session id   ARGV[8] due time ('' = leave the due queue)   ARGV[9] '1' if REAUTH_REQUIRED
 * ARGV[10] when the family ends at the latest ('' = not counted: see familyEndOf)
 * Returns 1 when committed, 0 on a compare-and-set miss (nothing changed).
 */
export const COMMIT_SESSION = `
local current = redis.call('HGET', KEYS[1], 'gen')
if ARGV[1] == '' then
  if current then return 0 end
elseif current ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'sealed', ARGV[3])
redis.call('HDEL', KEYS[1], 'inflight')
if not current then
  redis.call('HSET', KEYS[1], 'used', ARGV[4])
  redis.call('ZADD', KEYS[3], 0, ARGV[7])
end
if ARGV[8] == '' then
  redis.call('ZREM', KEYS[2], ARGV[7])
else
  redis.call('ZADD', KEYS[2], ARGV[8], ARGV[7])
end
if ARGV[9] == '1' then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[7])
else
  redis.call('ZREM', KEYS[4], ARGV[7])
end
if ARGV[10] == '' then
  redis.call('ZREM', KEYS[5], ARGV[7])
else
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[7])
end
if current ~= ARGV[2] then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
`;

/**
 * Marks a refresh-token presentation in flight, unless another may still be.
 * KEYS[1] session hash
 * ARGV[1] generation the marker is for   ARGV[2] marker JSON   ARGV[3] now (epoch ms)
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
 * Claims due sessions with a visibility lease: claimed entries move to the lease's end, so a
 * claimer that dies gives them back when the lease runs out.
 * KEYS[1] due sorted set
 * ARGV[1] now   ARGV[2] limit   ARGV[3] lease end (epoch ms)
 * Returns {id1, due1, id2, due2, ...}: each claimed session id and its score (due time) before
 * the claim.
 */
export const CLAIM_DUE = `
local claimed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #claimed, 2 do redis.call('ZADD', KEYS[1], ARGV[3], claimed[i]) end
return claimed
`;
