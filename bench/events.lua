-- wrk script: POST /v1/events with BATCH events per request, every event id unique.
local batch = tonumber(os.getenv("BATCH") or "1")
local prefix = os.getenv("PREFIX") or "bench"
local threads = {}
local counter = 0
local tid = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  counter = 0
end

local function one(id)
  return '{"id":"' .. id .. '","channel":"email","status":"delivered","message_id":"m-' .. id ..
    '","recipient":{"email":"user@example.com"},"attributes":{"order_id":"42"}}'
end

function request()
  counter = counter + 1
  local base = prefix .. "-" .. tid .. "-" .. counter
  local body
  if batch == 1 then
    body = one(base)
  else
    local parts = {}
    for k = 1, batch do parts[k] = one(base .. "-" .. k) end
    body = "[" .. table.concat(parts, ",") .. "]"
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d sockerr=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
