-- ARGV[1]: msgpack [[snapshot hash, event id, msgpack [model, version, probability]], ...].
-- Adds the served prediction as the snapshot's fourth element unless it has one
-- (a stored snapshot is a 3-element msgpack array until then: header byte 0x93).
local batch = cmsgpack.unpack(ARGV[1])
for n = 1, #batch do
  local key, id = batch[n][1], batch[n][2]
  local snap = redis.call('HGET', key, id)
  if snap and string.byte(snap, 1) == 147 then  -- 0x93: no served prediction yet
    redis.call('HSET', key, id, '\148' .. string.sub(snap, 2) .. batch[n][3])
  end
end
return {}
