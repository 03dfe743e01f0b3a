-- Shared by update_and_read.lua and read.lua (prepended to each); mirrors
-- riverflow.features.tiles step for step, so both stores add in the same order.
-- G[g]: B buckets per window, keep (buckets kept behind the newest), S Q MN MX L C
-- (1-based positions in the event's numbers of the fields keeping sum, square, min,
-- max, last; and the z-score fields), nx exact and na approximate distinct fields,
-- ent (the group's entity, an index into the event's entity keys), ttl (ms) of its
-- key, R (numbers per tile record). An entity key holds msgpack [w, {group index ->
-- [newest bucket, tiles]}], a group's tiles flat, one record of R values per bucket:
-- [bucket, n, newest ts, stats..., sets...]; flat because cmsgpack (un)packs one big
-- array ~2.5x faster than a table per tile. idx maps a bucket to its record's
-- offset. A third element, if any: {session group index -> its sessions, flat}.
local cache, order = {}, {}
local function load(key)
  local st = cache[key]
  if st then return st end
  st = {g = {}}
  local raw = redis.call('HGET', key, 's')
  if raw then
    local d = cmsgpack.unpack(raw)
    st.w = d[1]
    for gi, gd in pairs(d[2]) do
      local F = gd[2]
      if type(F[1]) == 'table' then  -- written by a scorer: a table per tile
        local flat = {}
        for _, rec in ipairs(F) do
          for x = 1, #rec do flat[#flat + 1] = rec[x] end
        end
        F = flat
      end
      st.g[gi] = {hb = gd[1], F = F}
    end
    st.sf = d[3]  -- sessions per session group, flat: see sessions()
  end
  cache[key] = st
  order[#order + 1] = key
  return st
end
local function grp(st, gi, g)
  local gs = st.g[gi]
  if gs and not gs.idx then
    gs.idx = {}
    local F = gs.F
    for p = 0, #F - 1, g.R do gs.idx[F[p + 1]] = p end
  end
  return gs
end
local function previous(gs, g, e)
  local newest, base = nil, nil
  if gs then
    local F, idx = gs.F, gs.idx
    for d = 1 - g.B, 0 do  -- B steps whatever e is (k = k + 1 stalls at 2^53)
      local p = idx[e + d]
      if p and (newest == nil or F[p + 3] > newest) then newest = F[p + 3]; base = p + 1 end
    end
  end
  local pv = {}
  if base then
    local o = base + 2 + #g.S + #g.Q + #g.MN + #g.MX
    for j = 1, #g.L do pv[j] = gs.F[o + j] end
  end
  return newest, pv
end
local function vector(gs, g, key, gi, e, since, pv, xs)
  local n = 0
  local s, q, lo, hi, sets = {}, {}, {}, {}, {}
  local ns, nq, nmin, nmax = #g.S, #g.Q, #g.MN, #g.MX
  for j = 1, ns do s[j] = 0 end
  for j = 1, nq do q[j] = 0 end
  for j = 1, g.nx do sets[j] = {} end
  if gs then
    local F, idx = gs.F, gs.idx
    for d = 1 - g.B, 0 do  -- B steps whatever e is (k = k + 1 stalls at 2^53)
      local p = idx[e + d]
      if p then
        n = n + F[p + 2]
        local o = p + 3
        for j = 1, ns do s[j] = s[j] + F[o + j] end
        o = o + ns
        for j = 1, nq do q[j] = q[j] + F[o + j] end
        o = o + nq
        for j = 1, nmin do
          if lo[j] == nil or F[o + j] < lo[j] then lo[j] = F[o + j] end
        end
        o = o + nmin
        for j = 1, nmax do
          if hi[j] == nil or F[o + j] > hi[j] then hi[j] = F[o + j] end
        end
        o = o + nmax + #g.L
        for j = 1, g.nx do
          for v in pairs(F[o + j]) do sets[j][v] = true end
        end
      end
    end
  end
  local out = {n, since and 1 or 0, since or 0}
  for j = 1, ns do out[#out + 1] = s[j] end
  for j = 1, nq do out[#out + 1] = q[j] end
  for j = 1, nmin do out[#out + 1] = lo[j] or 0 end
  for j = 1, nmax do out[#out + 1] = hi[j] or 0 end
  for j = 1, #g.L do out[#out + 1] = pv[j] or 0 end
  for j = 1, #g.C do out[#out + 1] = xs[g.C[j]] or 0 end
  for j = 1, g.nx do
    local c = 0
    for _ in pairs(sets[j]) do c = c + 1 end
    out[#out + 1] = c
  end
  for j = 1, g.na do
    local hk = {}
    for i = 1 - g.B, 0 do hk[#hk + 1] = key .. ':hll:' .. gi .. ':' .. j .. ':' .. (e + i) end
    out[#out + 1] = redis.call('PFCOUNT', unpack(hk))
  end
  return out
end
local function since_of(ts, newest)
  if newest == nil then return nil end
  local gap = ts - newest
  if gap > 0 then return gap end
  return 0
end

-- Session windows: mirrors riverflow.features.sessions step for step (the same
-- additions in the same order). SG[s]: gap and grace (s), S MN MX (1-based
-- positions in the event's numbers of the fields keeping sum, min, max), R
-- (numbers per session: first ts, last ts, n, sums, minima, maxima), ent, ttl.
local function sessions(st, si, sg)
  st.s = st.s or {}
  local S = st.s[si]
  if S then return S end
  S = {}
  local flat = st.sf and st.sf[si]
  if flat then
    for p = 0, #flat - sg.R, sg.R do
      local rec = {}
      for x = 1, sg.R do rec[x] = flat[p + x] end
      S[#S + 1] = rec
    end
  end
  st.s[si] = S
  return S
end
local function session_vector(s, sg)
  local out = {0, 0}
  if s then out = {s[3], s[2] - s[1]} end
  for x = 4, sg.R do out[x - 1] = s and s[x] or 0 end
  return out
end
local function session_read(S, sg, at)
  if #S == 0 then return nil end
  if at == nil then return session_vector(S[#S], sg) end
  for i = #S, 1, -1 do
    local s = S[i]
    if s[1] <= at then
      if at < s[2] + sg.gap then return session_vector(s, sg) end
      return session_vector(nil, sg)
    end
  end
  return session_vector(nil, sg)
end
