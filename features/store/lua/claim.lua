-- KEYS: pairs (snapshot key, learned key); ARGV[1]: learned-marker ttl ms, then a
-- token per pair. Returns per pair: '?' (no snapshot), the snapshot (marked now), or
-- '=' .. the existing token .. newline .. the snapshot (marked before).
local out = {}
for i = 1, #KEYS, 2 do
  local snap = redis.call('GET', KEYS[i])
  if not snap then
    out[#out + 1] = '?'
  elseif redis.call('SET', KEYS[i + 1], ARGV[(i + 1) / 2 + 1], 'NX', 'PX', ARGV[1]) then
    out[#out + 1] = snap
  else
    out[#out + 1] = '=' .. redis.call('GET', KEYS[i + 1]) .. '\n' .. snap
  end
end
return out
