-- wrk script for the fixed-rate scenario of scripts/bench/run.py, appended to wrk_report.lua
-- after a line setting `paced_interval_ms` (milliseconds between two requests of this wrk
-- thread: threads / offered rate).
--
-- wrk asks delay() how long to wait before each request of any connection. Each request gets
-- the next slot of a schedule of one request per paced_interval_ms, so the thread sends at the
-- offered rate however long the answers take (as long as a connection is free), instead of
-- each connection waiting a fixed time after its answer, which would lower the rate by the
-- round trip. A thread that falls behind does not catch up in a burst: the schedule restarts
-- from now. wrk counts a request's latency from when it is sent, so the wait is not in it.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } ringlb_bench_timespec;
  int clock_gettime(int clock, ringlb_bench_timespec *ts);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("ringlb_bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local next_slot = nil

delay = function()
  local now = now_ms()
  if next_slot == nil or next_slot < now then
    next_slot = now
  end
  local wait = next_slot - now
  next_slot = next_slot + paced_interval_ms
  -- wrk takes whole milliseconds: requests due within the same millisecond go together.
  return math.floor(wait)
end
