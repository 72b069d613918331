-- Stores ARGV[2] for ARGV[3] ms if the slot still holds the lease ARGV[1].
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
