-- ARGV: the group parameters, then per group: its entity key ('' to skip it), the
-- end bucket and the read time ('' and '' for "at the newest event"); then the
-- session group parameters and per session group: its entity key ('' to skip it)
-- and the read time ('' for the newest session). Runs after prelude.lua.
local G = cmsgpack.unpack(ARGV[1])
local out = {}
local a = 2
for gi = 1, #G do
  local key = ARGV[a]
  out[gi] = ''
  if key ~= '' then
    local st = load(key)
    local gs = grp(st, gi, G[gi])
    if st.w ~= nil and gs then
      local e = tonumber(ARGV[a + 1]) or gs.hb
      local ts = tonumber(ARGV[a + 2]) or st.w
      local newest, pv = previous(gs, G[gi], e)
      out[gi] = cmsgpack.pack(vector(gs, G[gi], key, gi, e, since_of(ts, newest), pv, {}))
    end
  end
  a = a + 3
end
local SG = cmsgpack.unpack(ARGV[a])
for si = 1, #SG do
  local key = ARGV[a + 1]
  out[#G + si] = ''
  if key ~= '' then
    local st = load(key)
    local v = session_read(sessions(st, si, SG[si]), SG[si], tonumber(ARGV[a + 2]))
    if v then out[#G + si] = cmsgpack.pack(v) end
  end
  a = a + 2
end
return out
