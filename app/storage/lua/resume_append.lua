-- Append one flush of a worker's resume logs: one call for every stream it wrote since the last flush.
-- KEYS: the streams' keys. ARGV[1]: TTL in ms; ARGV[2]: MAXLEN (~) or "" for none; then per key three
-- values: the frames (field d), "1" if this write starts the log, its owner (field o, on the first entry).
-- Each shape of XADD is spelled out: a table built and unpacked per key cost a fifth of redis-server's CPU.
local ttl, maxlen = ARGV[1], ARGV[2]
local trim = maxlen ~= ''
for i, key in ipairs(KEYS) do
  local j = 3 * i
  if ARGV[j + 1] == '1' then
    if trim then
      redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'd', ARGV[j], 'o', ARGV[j + 2])
    else
      redis.call('XADD', key, '*', 'd', ARGV[j], 'o', ARGV[j + 2])
    end
  elseif trim then
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'd', ARGV[j])
  else
    redis.call('XADD', key, '*', 'd', ARGV[j])
  end
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
