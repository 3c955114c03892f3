-- Replays one dead letter: remove the record, publish the envelope.
-- KEYS: dlq, queue; ARGV: record, envelope.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
