-- wrk script: POST a JSON body to /email with a fresh messageId in every event.
-- usage: wrk ... -s bench/post.lua URL -- TEMPLATE_FILE RUN_PREFIX [IDS]
-- TEMPLATE_FILE holds the body with "@ID@" where each messageId goes. IDS is "random" (default:
-- 20 random lowercase letters and digits, as Infobip makes them, so index inserts land anywhere
-- in the B-tree) or "sequential" (RUN_PREFIX-<thread>-<request>-<k>, always at the B-tree's
-- right edge: the old behaviour, kept to measure the difference). Random ids repeat with
-- probability ~1e-31 per pair, so the table's row count still equals the events accepted.
-- done() prints one line: "WRKJSON {...}".

local threads = {}
local counter = 1

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local parts, prefix, n, random_ids

-- 36^5 < 2^31: one math.random call gives five base-36 digits, so an id costs four calls
-- instead of twenty (wrk shares the two cores with the server under test).
local ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
local DIGITS = {}
for i = 1, 36 do DIGITS[i - 1] = string.sub(ALPHABET, i, i) end
local SPAN = 36 ^ 5

local function five()
  local v = math.random(0, SPAN - 1)
  local d = {}
  for i = 5, 1, -1 do
    d[i] = DIGITS[v % 36]
    v = math.floor(v / 36)
  end
  return table.concat(d)
end

local function infobip_id()
  return five() .. five() .. five() .. five()
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local template = f:read("*a")
  f:close()
  prefix = (args[2] or "run") .. "-" .. tostring(tid) .. "-"
  random_ids = (args[3] or "random") ~= "sequential"
  -- Each wrk thread has its own Lua state and generator: seed each differently, and differently
  -- per run, or two threads would send the same ids.
  local h = 0
  for i = 1, string.len(prefix) do h = (h * 31 + string.byte(prefix, i)) % 2147483647 end
  math.randomseed((os.time() % 100000) * 1000 + tid * 7919 + h)
  for _ = 1, 10 do math.random() end
  parts = {}
  local start = 1
  while true do
    local s, e = string.find(template, "@ID@", start, true)
    if not s then break end
    table.insert(parts, string.sub(template, start, s - 1))
    start = e + 1
  end
  table.insert(parts, string.sub(template, start))
  n = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  n = n + 1
  local buf = { parts[1] }
  for k = 2, #parts do
    if random_ids then
      buf[#buf + 1] = infobip_id()
    else
      buf[#buf + 1] = prefix .. n .. "-" .. (k - 1)
    end
    buf[#buf + 1] = parts[k]
  end
  return wrk.format(nil, nil, nil, table.concat(buf))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d,"lat_mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
