-- What a scorer computed in process (RedisFeatureStore._in_process), applied if
-- nothing it was computed from has changed. ARGV[1]: snapshot ttl ms; ARGV[2]:
-- msgpack [[snapshot hash, n, ...], [entity key, version it was read at, ttl ms, ...]]
-- (flat: cmsgpack builds one table per array, and a table per record cost more than
-- the writes); then the bytes, each an argument of its own: each hash's n arguments
-- (event id, snapshot, ...), hash after hash, then one new state per entity, in
-- order. Redis makes the arguments Lua strings once; inside the msgpack they were
-- decoded again (a 900-byte entity state cost Redis ~15% more CPU so). Returns 0,
-- writing nothing, if an event has a snapshot already (a replay) or an entity's
-- version moved (another writer, or the key expired); else writes all and returns 1.
local d = cmsgpack.unpack(ARGV[2])
local snaps, ents = d[1], d[2]
-- one HMGET and one HSET per 1,000 snapshots of a hash, not a command per event:
-- each redis.call costs about as much as the command it runs (unpack is limited to
-- ~8,000 values)
local at = 3
for i = 1, #snaps, 2 do
  local key, last = snaps[i], at + snaps[i + 1] - 1
  for j = at, last, 2000 do
    local ids = {}
    for k = j, math.min(last, j + 1999), 2 do ids[#ids + 1] = ARGV[k] end
    local got = redis.call('HMGET', key, unpack(ids))
    for k = 1, #got do
      if got[k] then return 0 end
    end
  end
  at = last + 1
end
local states = at
for i = 1, #ents, 3 do
  local v = tonumber(redis.call('HGET', ents[i], 'v')) or 0
  if v ~= ents[i + 1] then return 0 end
end
local ttl = ARGV[1]
at = 3
for i = 1, #snaps, 2 do
  local key, last = snaps[i], at + snaps[i + 1] - 1
  for j = at, last, 2000 do
    redis.call('HSET', key, unpack(ARGV, j, math.min(last, j + 1999)))
  end
  redis.call('PEXPIRE', key, ttl)
  at = last + 1
end
for i = 1, #ents, 3 do
  redis.call('HSET', ents[i], 's', ARGV[states], 'v', ents[i + 1] + 1)
  redis.call('PEXPIRE', ents[i], ents[i + 2])
  states = states + 1
end
return 1
