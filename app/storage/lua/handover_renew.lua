-- Renew a claimer's lease on a handed-over stream.
-- KEYS[1]: the handover stream; ARGV: group, entry id, consumer. Re-claim (reset the idle time) only
-- while this consumer still owns the entry: after a lapse, another claimer may have taken it.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
