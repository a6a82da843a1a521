-- POSTs binary bodies (Open Inference Protocol, binary tensor data extension) read from a records file,
-- cycling through them. Each record: an ASCII line "<body bytes> <JSON header bytes>\n", then the body
-- (bench/data.py writes them). Each request carries Content-Type: application/octet-stream and
-- Inference-Header-Content-Length: <JSON header bytes>.
--   wrk -s bench/wrk/binary.lua URL -- RECORDS_FILE
-- At the end prints one line, "BENCH_JSON {...}", with the counts and latency percentiles (us), as post.lua.

local bodies = {}
local headers = {}
local next_body = 0
local threads = 0

function setup(thread)
  thread:set("offset", threads * 7919)  -- threads start at different bodies
  threads = threads + 1
end

function init(args)
  local file = assert(io.open(args[1], "rb"), "cannot open records file " .. tostring(args[1]))
  local data = file:read("*a")
  file:close()
  local pos = 1
  while pos <= #data do
    local eol = assert(string.find(data, "\n", pos, true), "record without its length line at byte " .. pos)
    local size, header_length = string.match(string.sub(data, pos, eol - 1), "^(%d+) (%d+)$")
    assert(size, "bad length line at byte " .. pos)
    size = tonumber(size)
    assert(eol + size <= #data, "record at byte " .. pos .. " runs past the end of the file")
    bodies[#bodies + 1] = string.sub(data, eol + 1, eol + size)
    headers[#headers + 1] = {["Content-Type"] = "application/octet-stream",
                             ["Inference-Header-Content-Length"] = header_length}
    pos = eol + size + 1
  end
  assert(#bodies > 0, "no records in " .. args[1])
  wrk.method = "POST"
  next_body = (offset or 0) % #bodies
end

function request()
  next_body = next_body % #bodies + 1
  -- wrk.format adds Host and Content-Length to the table it is given; both stay the same for one body
  return wrk.format(nil, nil, headers[next_body], bodies[next_body])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us": %d, "requests": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, ' ..
    '"errors_write": %d, "errors_timeout": %d, "errors_status": %d, "latency_mean_us": %.1f, ' ..
    '"latency_p50_us": %d, "latency_p90_us": %d, "latency_p99_us": %d, "latency_max_us": %d}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.timeout, e.status,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
