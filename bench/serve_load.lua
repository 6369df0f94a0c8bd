-- wrk's side of bench/serve.py (wrk: a load generator in C, so that the clients take little of the 2 cores
-- the server runs on). Each wrk thread holds one keep-alive connection (wrk -t N -c N), sends its share of
-- the requests one after the other, checks each answer's status, writes what it saw to a file and stops.
--
-- Arguments (after wrk's "--"): <requests file> <requests per thread> <path> <output folder>
-- The requests file, written by bench/serve.py, holds one record per request:
--   "<expected status> <name> <content type> <body length>\n" then the body's bytes
-- A thread sends record first, first + 1, ... (cyclically), first = 7 x its index. With one connection per
-- thread and no pipelining, the answer wrk hands to response() is the answer to the request just sent.
-- Its file, <output folder>/thread-<index>.txt (written whole, then renamed), holds:
--   "<first send, us> <last answer, us> <good> <bad answered right> <errors>", then one line per good
--   request's latency in microseconds (send to answer, CLOCK_MONOTONIC), then "error <one line>" per error.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } mpad_timespec;
int clock_gettime(int clock_id, mpad_timespec *out);
]]
local clock = ffi.new("mpad_timespec")
local function now_us()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000000 + tonumber(clock.tv_nsec) / 1000
end

index = 0 -- set by setup()
local records, n, sent, output = {}, 0, 0, ""
local current, began, t0, t1 = nil, 0, nil, 0
local good, bad_ok, latencies, errors = 0, 0, {}, {}

local count = 0
function setup(thread) -- in wrk's setup environment, once per thread
  thread:set("index", count)
  count = count + 1
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  while true do
    local head = file:read("*l")
    if head == nil then break end
    local want, name, kind, length = head:match("^(%d+) (%S+) (%S+) (%d+)$")
    local body = file:read(tonumber(length)) or ""
    records[#records + 1] = {want = tonumber(want), name = name,
      text = wrk.format("POST", args[3], {["Content-Type"] = kind}, body)}
  end
  file:close()
  n, output = tonumber(args[2]), args[4]
  sent = (index * 7) % #records
end

function request()
  current = records[(sent % #records) + 1]
  sent = sent + 1
  began = now_us()
  t0 = t0 or began
  return current.text
end

local function finish()
  local lines = {string.format("%d %d %d %d %d", t0, t1, good, bad_ok, #errors)}
  for _, us in ipairs(latencies) do lines[#lines + 1] = string.format("%d", us) end
  for _, line in ipairs(errors) do lines[#lines + 1] = "error " .. line end
  local path = output .. "/thread-" .. index .. ".txt"
  local file = assert(io.open(path .. ".tmp", "wb"))
  file:write(table.concat(lines, "\n"), "\n")
  file:close()
  assert(os.rename(path .. ".tmp", path))
  wrk.thread:stop()
end

function response(status, headers, body)
  t1 = now_us()
  if status == current.want then
    if status == 200 then
      good = good + 1
      latencies[#latencies + 1] = t1 - began
    else
      bad_ok = bad_ok + 1
    end
  else
    local text = string.sub(body or "", 1, 160):gsub("%s+", " ")
    errors[#errors + 1] = current.name .. ": " .. status .. " instead of " .. current.want .. ": " .. text
  end
  if good + bad_ok + #errors >= n then finish() end
end

function done(summary, latency, requests) -- wrk's own count of failed connections, reads, writes, timeouts
  local e = summary.errors
  io.write(string.format("mpad-load socket_errors %d\n", e.connect + e.read + e.write + e.timeout))
end
