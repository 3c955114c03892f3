-- wrk script: POST a JSON body to /email with a unique messageId in every event.
-- usage: wrk ... -s bench/post.lua URL -- TEMPLATE_FILE RUN_PREFIX
-- TEMPLATE_FILE holds the body with "@ID@" where each messageId goes; every request fills each
-- placeholder with RUN_PREFIX-<thread>-<request>-<k>, so no two events share a dedupe key and
-- the table's row count equals the events accepted. done() prints one line: "WRKJSON {...}".

local threads = {}
local counter = 1

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local parts, prefix, n

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local template = f:read("*a")
  f:close()
  prefix = (args[2] or "run") .. "-" .. tostring(tid) .. "-"
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
    buf[#buf + 1] = prefix .. n .. "-" .. (k - 1)
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
