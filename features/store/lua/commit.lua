-- What a scorer computed in process (RedisFeatureStore._in_process), applied if
-- nothing it was computed from has changed. ARGV[1]: snapshot ttl ms; ARGV[2]:
-- msgpack [[snapshot key, snapshot, ...], [entity key, version it was read at,
-- new state, ttl ms, ...]] (flat: cmsgpack builds one table per array, and a
-- table per record cost more than the writes). Returns 0, writing nothing, if an
-- event has a snapshot already (a replay) or an entity's version moved (another
-- writer, or the key expired); else writes all and returns 1.
local d = cmsgpack.unpack(ARGV[2])
local snaps, ents = d[1], d[2]
-- one EXISTS per 1,000 snapshot keys, not one per key: each redis.call costs
-- about as much as the command it runs (unpack is limited to ~8,000 values)
for i = 1, #snaps, 2000 do
  local keys = {}
  for j = i, math.min(#snaps, i + 1999), 2 do keys[#keys + 1] = snaps[j] end
  if redis.call('EXISTS', unpack(keys)) > 0 then return 0 end
end
for i = 1, #ents, 4 do
  local v = tonumber(redis.call('HGET', ents[i], 'v')) or 0
  if v ~= ents[i + 1] then return 0 end
end
local ttl = ARGV[1]
for i = 1, #snaps, 2 do redis.call('SET', snaps[i], snaps[i + 1], 'PX', ttl) end
for i = 1, #ents, 4 do
  redis.call('HSET', ents[i], 's', ents[i + 2], 'v', ents[i + 1] + 1)
  redis.call('PEXPIRE', ents[i], ents[i + 3])
end
return 1
