-- A resumed tail's reader mark. KEYS[1]: the mark, KEYS[2]: the bell; ARGV[1]: the mark's TTL in ms.
-- A mark placed where none was rings the bell after it: the stream's producer, hearing it, finds the mark
-- (and writes the stream every flush from then on). Returns 1 if it rang.
local new = redis.call('EXISTS', KEYS[1]) == 0
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
if new then
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
