-- Releases the restore lock only if we still hold it (as redis-py's `Lock.release`).
-- KEYS: the lock; ARGV: our token.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
