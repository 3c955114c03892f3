-- Moves one expired unacked entry back to a queue, unless someone acked, retried or restored
-- it since we read it. KEYS: unacked, unacked_index, target queue; ARGV: tag, envelope, ceiling.
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 or (score and tonumber(score) > tonumber(ARGV[3])) then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
