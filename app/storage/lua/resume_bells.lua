-- A worker's bells, once per flush tick (resume/redis_streams.py `bells`). KEYS[1]: the stop bell, KEYS[2]: the
-- readers' stream (announcements of new readers); ARGV[1]: the worker's cursor in it ('' before its first read),
-- ARGV[2]: the most announcements returned. Returns {stop bell, newest announcement's id or false, announcements
-- after the cursor or false}, or {stop bell, 'unreadable'} when the readers' stream cannot be read (a key of
-- another type): the stop bell is heard all the same.
local bell = redis.call('GET', KEYS[1])
local newest = redis.pcall('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if newest.err then
  return {bell, 'unreadable'}
end
local after = false
if ARGV[1] ~= '' then
  after = redis.pcall('XRANGE', KEYS[2], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
  if after.err then
    return {bell, 'unreadable'}
  end
end
return {bell, newest[1] and newest[1][1] or false, after}
