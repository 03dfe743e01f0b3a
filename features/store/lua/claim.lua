-- KEYS: pairs (snapshot key, learned key); ARGV[1]: learned-marker ttl ms, then a
-- token per pair. Returns per pair: '!' (marked an orphan), '?' (no snapshot), the
-- snapshot (marked now), or '=' .. the existing token .. newline .. the snapshot
-- (marked before).
local out = {}
for i = 1, #KEYS, 2 do
  local mark = redis.call('GET', KEYS[i + 1])
  local snap = redis.call('GET', KEYS[i])
  if mark == 'orphan' then
    out[#out + 1] = '!'
  elseif not snap then
    out[#out + 1] = '?'
  elseif not mark then
    redis.call('SET', KEYS[i + 1], ARGV[(i + 1) / 2 + 1], 'PX', ARGV[1])
    out[#out + 1] = snap
  else
    out[#out + 1] = '=' .. mark .. '\n' .. snap
  end
end
return out
