-- ARGV: snapshot ttl ms, lateness s, the group parameters, the batch (msgpack):
-- per event [[snapshot hash, event id], context JSON, ts, [entity keys], [per group: [bucket,
-- [numbers], [exact then approximate distinct strings]]], [per session group:
-- [numbers]], [entity indices it reads nothing from and adds nothing to (a slate's
-- pair; their groups' vectors are false)]], then the session group parameters. Runs
-- after prelude.lua.
local function add(st, gi, g, key, b, ts, xs, strs)
  local gs = st.g[gi]
  if not gs then gs = {hb = b, F = {}, idx = {}}; st.g[gi] = gs end
  local F = gs.F
  local p = gs.idx[b]
  if not p then
    p = #F
    gs.idx[b] = p
    F[p + 1] = b; F[p + 2] = 0; F[p + 3] = ts
    local m = p + 3
    for j = 1, #g.S + #g.Q do m = m + 1; F[m] = 0 end
    for j = 1, #g.MN do m = m + 1; F[m] = xs[g.MN[j]] end
    for j = 1, #g.MX do m = m + 1; F[m] = xs[g.MX[j]] end
    for j = 1, #g.L do m = m + 1; F[m] = xs[g.L[j]] end
    for j = 1, g.nx do m = m + 1; F[m] = {} end
  end
  F[p + 2] = F[p + 2] + 1
  local newest = ts >= F[p + 3]
  if newest then F[p + 3] = ts end
  local o = p + 3
  for j = 1, #g.S do F[o + j] = F[o + j] + xs[g.S[j]] end
  o = o + #g.S
  for j = 1, #g.Q do
    local x = xs[g.Q[j]]
    F[o + j] = F[o + j] + x * x
  end
  o = o + #g.Q
  for j = 1, #g.MN do
    local x = xs[g.MN[j]]
    if x < F[o + j] then F[o + j] = x end
  end
  o = o + #g.MN
  for j = 1, #g.MX do
    local x = xs[g.MX[j]]
    if x > F[o + j] then F[o + j] = x end
  end
  o = o + #g.MX
  if newest then
    for j = 1, #g.L do F[o + j] = xs[g.L[j]] end
  end
  o = o + #g.L
  for j = 1, g.nx do F[o + j][strs[j]] = true end
  for j = 1, g.na do
    local hk = key .. ':hll:' .. gi .. ':' .. j .. ':' .. b
    redis.call('PFADD', hk, strs[g.nx + j])
    redis.call('PEXPIRE', hk, g.ttl)
  end
  if b > gs.hb then gs.hb = b end
  st.dirty = g.ttl
  return gs
end

-- one event at ts in session group sg's sessions S (features.sessions): its
-- session's vector, and whether it was late (then nothing changes)
local function session_add(st, S, sg, ts, xs)
  local w = st.w
  if w ~= nil and ts < w - sg.grace then return session_vector(S[#S], sg), true end
  local new = {ts, ts, 1}
  for j = 1, #sg.S do new[#new + 1] = xs[sg.S[j]] end
  for j = 1, #sg.MN do new[#new + 1] = xs[sg.MN[j]] end
  for j = 1, #sg.MX do new[#new + 1] = xs[sg.MX[j]] end
  local a, b = 3 + #sg.S, 3 + #sg.S + #sg.MN
  local gap, kept, placed = sg.gap, {}, false
  for _, s in ipairs(S) do
    if s[1] - gap < ts and ts < s[2] + gap then
      if s[1] < new[1] then new[1] = s[1] end
      if s[2] > new[2] then new[2] = s[2] end
      for x = 3, a do new[x] = new[x] + s[x] end
      for x = a + 1, b do if s[x] < new[x] then new[x] = s[x] end end
      for x = b + 1, sg.R do if s[x] > new[x] then new[x] = s[x] end end
    else
      if not placed and s[1] > ts then kept[#kept + 1] = new; placed = true end
      kept[#kept + 1] = s
    end
  end
  if not placed then kept[#kept + 1] = new end
  local newest = ts
  if w ~= nil and w > ts then newest = w end
  local horizon = newest - sg.grace
  for i = #S, 1, -1 do S[i] = nil end
  for _, s in ipairs(kept) do
    if s[2] + gap > horizon then S[#S + 1] = s end
  end
  st.dirty = sg.ttl
  return session_vector(new, sg), false
end

local snap_ttl = ARGV[1]
local lateness = tonumber(ARGV[2])
local G = cmsgpack.unpack(ARGV[3])
local batch = cmsgpack.unpack(ARGV[4])
local SG = cmsgpack.unpack(ARGV[5])
local tiled = {}  -- entities (by index) with tile groups: only they are too late for tiles
for gi = 1, #G do tiled[G[gi].ent] = true end
local out = {}
local hashes = {}  -- the snapshot hashes written: each expires once, at the end
for n = 1, #batch do
  local ev = batch[n]
  local where = ev[1]
  local stored = redis.call('HGET', where[1], where[2])
  if stored then
    out[n] = '=' .. stored
  else
    local ts, keys = ev[3], ev[4]
    local ents, too_late, late = {}, {}, 0
    local read_only = {}  -- a slate's pair: entities its request counted in already
    for _, e in ipairs(ev[7]) do read_only[e] = true end
    for e = 1, #keys do
      ents[e] = load(keys[e])
      too_late[e] = tiled[e] and ents[e].w ~= nil and ts < ents[e].w - lateness
      if too_late[e] and not read_only[e] then late = 1 end
    end
    local vecs = {}
    for gi = 1, #G do
      local g, gd = G[gi], ev[5][gi]
      if read_only[g.ent] then
        vecs[gi] = false  -- None: the scorer gives it the pair's that counted
      else
        local st = ents[g.ent]
        local gs = grp(st, gi, g)
        local b = gd[1]
        local e = b
        if too_late[g.ent] and gs then e = gs.hb end
        local newest, pv = previous(gs, g, e)
        if not too_late[g.ent] then gs = add(st, gi, g, keys[g.ent], b, ts, gd[2], gd[3]) end
        vecs[gi] = vector(gs, g, keys[g.ent], gi, e, since_of(ts, newest), pv, gd[2])
      end
    end
    local applied = {}
    for e = 1, #keys do applied[e] = tiled[e] and not too_late[e] and not read_only[e] end
    for si = 1, #SG do
      local sg = SG[si]
      if read_only[sg.ent] then
        vecs[#G + si] = false  -- None, as for its tile groups
      else
        local st = ents[sg.ent]
        local v, was_late = session_add(st, sessions(st, si, sg), sg, ts, ev[6][si])
        vecs[#G + si] = v
        if was_late then late = 1 else applied[sg.ent] = true end
      end
    end
    for e = 1, #keys do
      if applied[e] and (ents[e].w == nil or ts > ents[e].w) then ents[e].w = ts end
    end
    local snap = cmsgpack.pack({ev[2], vecs, late})
    redis.call('HSET', where[1], where[2], snap)
    hashes[where[1]] = true
    out[n] = snap
  end
end
for key in pairs(hashes) do redis.call('PEXPIRE', key, snap_ttl) end
for _, key in ipairs(order) do
  local st = cache[key]
  if st.dirty then
    local groups = {}
    for gi, gs in pairs(st.g) do
      local g, F = G[gi], gs.F
      local oldest = gs.hb - g.keep
      local kept = F
      for p = 0, #F - 1, g.R do
        if F[p + 1] <= oldest then kept = nil; break end
      end
      if not kept then
        kept = {}
        for p = 0, #F - 1, g.R do
          if F[p + 1] > oldest then
            for x = 1, g.R do kept[#kept + 1] = F[p + x] end
          end
        end
      end
      groups[gi] = {gs.hb, kept}
    end
    local kept = st.sf
    if st.s then
      kept = {}
      if st.sf then for si, flat in pairs(st.sf) do kept[si] = flat end end
      for si, S in pairs(st.s) do
        local flat = {}
        for _, s in ipairs(S) do
          for x = 1, #s do flat[#flat + 1] = s[x] end
        end
        kept[si] = flat
      end
    end
    redis.call('HSET', key, 's', cmsgpack.pack({st.w, groups, kept}))
    redis.call('HINCRBY', key, 'v', 1)
    redis.call('PEXPIRE', key, st.dirty)
  end
end
return out
