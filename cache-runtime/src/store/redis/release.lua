-- Deletes the slot if it still holds the lease ARGV[1].
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
