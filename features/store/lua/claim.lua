-- KEYS: the learned-mark key of each label's event; ARGV[1]: mark ttl ms, then per
-- key the label's token and '1' if the learner holds the scored event, else '0'.
-- Returns per key: '!' (marked an orphan), '+' (known, unmarked: marked now),
-- '?' (unknown, unmarked), or '=' .. the existing token (marked before).
local out = {}
for i = 1, #KEYS do
  local mark = redis.call('GET', KEYS[i])
  if mark == 'orphan' then
    out[i] = '!'
  elseif mark then
    out[i] = '=' .. mark
  elseif ARGV[2 * i + 1] == '1' then
    redis.call('SET', KEYS[i], ARGV[2 * i], 'PX', ARGV[1])
    out[i] = '+'
  else
    out[i] = '?'
  end
end
return out
