-- A per-client stream lease, if the client holds fewer than the limit (expired leases swept first).
-- KEYS[1]: sorted set lease id -> expiry (Redis TIME, ms); ARGV: limit, ttl ms, lease id.
-- The key expires with its longest-lived lease.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(newest[2])))
return 1
