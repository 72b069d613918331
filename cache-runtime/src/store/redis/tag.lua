-- Returns the tag token, creating it (nonce ARGV[1] + '.' + server time in microseconds) when missing and
-- ARGV[2] > 0; makes it live at least ARGV[2] ms.
local v = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if not v then
  if ttl <= 0 then return false end
  local t = redis.call('TIME')
  v = ARGV[1] .. '.' .. t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[1], v, 'PX', ttl)
  return v
end
if ttl > 0 then
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 and left < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
return v
