-- Dead-letters one unacked message: push the record and ack, only if it is still unacked.
-- KEYS: unacked, unacked_index, dlq; ARGV: tag, record.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
