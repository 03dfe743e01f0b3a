-- What a scorer computed in process (RedisFeatureStore._in_process), applied if
-- nothing it was computed from has changed. ARGV[1]: snapshot ttl ms; ARGV[2]:
-- msgpack [[snapshot hash, [event id, snapshot, ...], ...], [entity key, version it
-- was read at, new state, ttl ms, ...]] (flat: cmsgpack builds one table per array,
-- and a table per record cost more than the writes). A large new state is not in the
-- msgpack but an argument of its own, and its place holds the argument's index:
-- Redis makes an argument a Lua string once, where cmsgpack would decode it again
-- (a 900-byte state cost Redis ~15% more CPU so). Returns 0, writing nothing, if
-- an event has a snapshot already (a replay) or an entity's version moved (another
-- writer, or the key expired); else writes all and returns 1.
local d = cmsgpack.unpack(ARGV[2])
local snaps, ents = d[1], d[2]
-- one HMGET and one HSET per 1,000 snapshots of a hash, not a command per event:
-- each redis.call costs about as much as the command it runs (unpack is limited to
-- ~8,000 values)
for i = 1, #snaps, 2 do
  local key, fields = snaps[i], snaps[i + 1]
  for j = 1, #fields, 2000 do
    local ids = {}
    for k = j, math.min(#fields, j + 1999), 2 do ids[#ids + 1] = fields[k] end
    local got = redis.call('HMGET', key, unpack(ids))
    for k = 1, #got do
      if got[k] then return 0 end
    end
  end
end
for i = 1, #ents, 4 do
  local v = tonumber(redis.call('HGET', ents[i], 'v')) or 0
  if v ~= ents[i + 1] then return 0 end
end
local ttl = ARGV[1]
for i = 1, #snaps, 2 do
  local key, fields = snaps[i], snaps[i + 1]
  for j = 1, #fields, 2000 do
    redis.call('HSET', key, unpack(fields, j, math.min(#fields, j + 1999)))
  end
  redis.call('PEXPIRE', key, ttl)
end
for i = 1, #ents, 4 do
  local state = ents[i + 2]
  if type(state) == 'number' then state = ARGV[state] end
  redis.call('HSET', ents[i], 's', state, 'v', ents[i + 1] + 1)
  redis.call('PEXPIRE', ents[i], ents[i + 3])
end
return 1
