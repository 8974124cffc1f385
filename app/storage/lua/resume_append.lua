-- Append one flush of a worker's resume logs: one call for every stream it wrote since the last flush.
-- KEYS: the streams' keys. ARGV[1]: TTL in ms; ARGV[2]: MAXLEN (~) or "" for none; then per key three
-- values: the frames (field d), "1" if this write starts the log, its owner (field o, on the first entry).
local ttl, maxlen = ARGV[1], ARGV[2]
for i, key in ipairs(KEYS) do
  local j = 3 * i
  local xadd = {'XADD', key}
  if maxlen ~= '' then
    xadd[3], xadd[4], xadd[5] = 'MAXLEN', '~', maxlen
  end
  xadd[#xadd + 1] = '*'
  xadd[#xadd + 1] = 'd'
  xadd[#xadd + 1] = ARGV[j]
  if ARGV[j + 1] == '1' then
    xadd[#xadd + 1] = 'o'
    xadd[#xadd + 1] = ARGV[j + 2]
  end
  redis.call(unpack(xadd))
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
