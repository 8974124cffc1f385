-- A resumed tail's reader mark. KEYS[1]: the mark, KEYS[2]: the readers' stream (the announcements of new
-- marks); ARGV[1]: the mark's TTL in ms, ARGV[2]: the readers' stream's MAXLEN (~), ARGV[3]: the stream id.
-- A mark placed where none was is announced after it, naming its stream: the stream's producer, reading the
-- announcement, finds the mark (and writes the stream every flush from then on). Returns 1 if announced.
local new = redis.call('EXISTS', KEYS[1]) == 0
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
if new then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 's', ARGV[3])
  return 1
end
return 0
