-- ARGV[1]: msgpack [[snapshot key, msgpack [model, version, probability]], ...].
-- Adds the served prediction as the snapshot's fourth element unless it has one
-- (a stored snapshot is a 3-element msgpack array until then: header byte 0x93).
local batch = cmsgpack.unpack(ARGV[1])
for n = 1, #batch do
  local key = batch[n][1]
  local snap = redis.call('GET', key)
  if snap and string.byte(snap, 1) == 147 then  -- 0x93: no served prediction yet
    redis.call('SET', key, '\148' .. string.sub(snap, 2) .. batch[n][2], 'KEEPTTL')
  end
end
return {}
