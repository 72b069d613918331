-- Returns the sequence (0 when missing), first raised to ARGV[1] if it is lower.
local n = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local floor = tonumber(ARGV[1])
if n < floor then
  redis.call('SET', KEYS[1], ARGV[1])
  return floor
end
return n
