-- Pops up to ARGV[1] envelopes, and no more than ARGV[4] bytes of them unless the first alone
-- is larger, from KEYS[1] and records each as unacked, atomically.
-- Returns {tag, envelope, tag, envelope, ...}.
-- KEYS: queue, unacked_index, unacked; ARGV: max, now, fallback tag prefix, max bytes.
local out = {}
local bytes = 0
local max_bytes = tonumber(ARGV[4])
for i = 1, tonumber(ARGV[1]) do
  -- Looked at before it is popped: past the byte budget it stays first in line for the next
  -- fetch (the first message is always taken, however large).
  local env = redis.call('LINDEX', KEYS[1], -1)
  if not env then break end
  if #out > 0 and bytes + #env > max_bytes then break end
  redis.call('RPOP', KEYS[1])
  bytes = bytes + #env
  local tag, ex, rk = nil, '', KEYS[1]
  local ok, m = pcall(cjson.decode, env)
  local entry
  if ok and type(m) == 'table' then
    local p = m['properties']
    if type(p) == 'table' then
      if type(p['delivery_tag']) == 'string' and p['delivery_tag'] ~= '' then
        tag = p['delivery_tag']
      end
      local di = p['delivery_info']
      if type(di) == 'table' then
        if type(di['exchange']) == 'string' then ex = di['exchange'] end
        if type(di['routing_key']) == 'string' then rk = di['routing_key'] end
      end
    end
    -- kombu stores [message, exchange, routing_key]; the envelope is kept byte for byte.
    entry = '[' .. env .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']'
  else
    -- Not JSON: keep it as a JSON string so the entry stays readable; our worker dead-letters it.
    entry = cjson.encode({env, ex, rk})
  end
  if not tag then tag = ARGV[3] .. i end
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  redis.call('HSET', KEYS[3], tag, entry)
  out[#out + 1] = tag
  out[#out + 1] = env
end
return out
