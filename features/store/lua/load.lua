-- ARGV: entity keys. Each one's state and version ([s, v], nil where absent), in
-- order: the entities a scorer computes in process, read in one command (a
-- pipeline of HMGETs costs the client ~25 us per key to pack and parse).
local out = {}
for n = 1, #ARGV do
  out[n] = redis.call('HMGET', ARGV[n], 's', 'v')
end
return out
