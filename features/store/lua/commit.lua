-- What a scorer computed in process (RedisFeatureStore._in_process), applied if
-- nothing it was computed from has changed. ARGV[1]: snapshot ttl ms; ARGV[2]:
-- msgpack [[snapshot key, snapshot], ...], [[entity key, version it was read at,
-- new state, ttl ms], ...]]. Returns 0, writing nothing, if an event has a
-- snapshot already (a replay) or an entity's version moved (another writer, or
-- the key expired); else writes all and returns 1.
local d = cmsgpack.unpack(ARGV[2])
local snaps, ents = d[1], d[2]
for i = 1, #snaps do
  if redis.call('EXISTS', snaps[i][1]) == 1 then return 0 end
end
for i = 1, #ents do
  local v = tonumber(redis.call('HGET', ents[i][1], 'v')) or 0
  if v ~= ents[i][2] then return 0 end
end
for i = 1, #snaps do redis.call('SET', snaps[i][1], snaps[i][2], 'PX', ARGV[1]) end
for i = 1, #ents do
  local e = ents[i]
  redis.call('HSET', e[1], 's', e[3], 'v', e[2] + 1)
  redis.call('PEXPIRE', e[1], e[4])
end
return 1
