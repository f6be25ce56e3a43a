-- The wrk script of the HTTP workloads (benchmarks/httpworkloads.py), one of
-- four modes, given after wrk's "--":
--
--   paths FILE            the paths listed in FILE (one a line, relative to the
--                         shared folder), round-robin, each thread starting at
--                         its own place in the list
--   once FILE THREADS     each path listed in FILE exactly once: thread i of
--                         THREADS takes the i-th path and every THREADS-th after
--                         it; a thread that has all its replies writes the line
--                         "wrk-thread-done" (flushed) and stops
--   range PATH SIZE LEN   GET /PATH with "Range: bytes=A-(A+LEN-1)", A a random
--                         offset in [0, SIZE-LEN], a new one for every request
--   (nothing)             the URL given to wrk, over and over
--
-- wrk itself has no "stop after N requests": its main thread sleeps for the
-- whole -d whatever the threads do, and only SIGINT cuts that sleep short.
-- So in "once" mode httpclients.py gives a -d far longer than the run, waits
-- for every thread's "wrk-thread-done" and then sends wrk SIGINT; wrk's
-- duration then ends a few milliseconds after the last reply.
--
-- At the end it prints one line, "wrk-json {...}", with the figures run.py
-- reads (wrk's own text report, with --latency, comes before it).

local threads = 0

function setup(thread)
   thread:set("id", threads)
   threads = threads + 1
end

local mode, requests, next_request, path, size, len
-- "once" mode: requests handed to a connection so far, and replies read.
local granted, replies = 0, 0
-- What delay() says once a thread has sent its share: longer than any run.
local NEVER_MS = 24 * 3600 * 1000

-- "once" mode's delay(): wrk asks it before every request a connection is
-- about to send, so it is where a thread stops sending: past its share, the
-- connection waits for ever instead of asking request() for a path that is
-- not there (request() cannot decline to send one).
local function once_delay()
   if granted < #requests then
      granted = granted + 1
      return 0
   end
   return NEVER_MS
end

local function once_response(status, headers, body)
   replies = replies + 1
   if replies == #requests then
      io.write("wrk-thread-done\n")
      io.flush()
      wrk.thread:stop()
   end
end

function init(args)
   mode = args[1] or ""
   if mode == "paths" then
      requests = {}
      for line in io.lines(args[2]) do
         if line ~= "" then
            requests[#requests + 1] = wrk.format("GET", "/" .. line)
         end
      end
      -- Threads start 1/7 of the list apart (any spread will do), so that
      -- they do not ask for the same file at the same moment.
      next_request = (id * math.floor(#requests / 7)) % #requests
   elseif mode == "once" then
      local every = tonumber(args[3])
      requests = {}
      local n = 0
      for line in io.lines(args[2]) do
         if line ~= "" then
            if n % every == id then
               requests[#requests + 1] = wrk.format("GET", "/" .. line)
            end
            n = n + 1
         end
      end
      next_request = 0
      -- Defined here, not at the top: wrk looks for delay() and response()
      -- after init(), and with either it pays for them on every request,
      -- which the other modes have no need of.
      delay = once_delay
      response = once_response
   elseif mode == "range" then
      path = "/" .. args[2]
      size = tonumber(args[3])
      len = tonumber(args[4])
      math.randomseed(1000 + id)
   end
end

function request()
   if mode == "paths" or mode == "once" then
      -- The wrap-around keeps "once" exact: before the run wrk calls
      -- request() once in thread 0 to check that it parses, sending
      -- nothing, and the path that call took comes round again as that
      -- thread's last one (delay() lets through exactly its share).
      next_request = next_request % #requests + 1
      return requests[next_request]
   elseif mode == "range" then
      local first = math.random(0, size - len)
      local range = string.format("bytes=%d-%d", first, first + len - 1)
      return wrk.format("GET", path, { Range = range })
   end
   return wrk.request()
end

function done(summary, latency, _)
   local e = summary.errors
   io.write(string.format(
      'wrk-json {"requests":%.0f,"bytes":%.0f,"duration_us":%.0f,'
         .. '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},'
         .. '"latency_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"max":%.0f,"mean":%.1f}}\n',
      summary.requests, summary.bytes, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
