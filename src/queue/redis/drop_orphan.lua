-- Drops an orphan index entry (no envelope in `unacked`), as kombu's restore does.
-- KEYS: unacked, unacked_index; ARGV: tag.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 0
