-- Reads the value slot; takes the lease when it is empty (or holds exactly ARGV[3] when ARGV[4] = '1').
-- Returns {1, value} | {2} (leased by another) | {3, seconds, microseconds} (lease taken).
local v = redis.call('GET', KEYS[1])
if v and ARGV[4] == '1' and v == ARGV[3] then v = false end
if v then
  if string.sub(v, 1, 2) == '\0L' then return {2} end
  return {1, v}
end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {3, t[1], t[2]}
