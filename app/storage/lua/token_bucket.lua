-- One token-bucket decision, atomically: refill, decide, debit, expire (the ratelimit `take` step).
-- KEYS[1]: bucket hash {tokens, ts}; ARGV: capacity, refill per second, cost, epsilon.
-- Time is Redis TIME in integer microseconds (exact in a double). A refusal writes nothing: refilling
-- is linear, so the stored state stays equivalent, and a client hammering a refused key costs no
-- writes. The key expires when the bucket would be full again, since a full bucket equals a missing
-- one. Floats go back as strings: a Lua number would be truncated to an integer reply.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local epsilon = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens, last = capacity, now
elseif now > last then
  tokens = math.min(capacity, tokens + (now - last) / 1000000 * rate)
  last = now
end
local allowed, wait = 0, 0
if tokens + epsilon >= cost then
  allowed = 1
  tokens = math.max(0, tokens - cost)
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', last))
  local ttl = math.ceil((last - now) / 1000 + (capacity - tokens) / rate * 1000)
  redis.call('PEXPIRE', KEYS[1], math.max(1, ttl))
else
  wait = (cost - tokens) / rate + math.max(0, last - now) / 1000000
end
return {allowed, string.format('%.17g', tokens), string.format('%.17g', wait)}
