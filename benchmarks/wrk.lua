-- The wrk script of the HTTP workloads (benchmarks/httpworkloads.py), one of
-- three modes, given after wrk's "--":
--
--   paths FILE            the paths listed in FILE (one a line, relative to the
--                         shared folder), round-robin, each thread starting at
--                         its own place in the list
--   range PATH SIZE LEN   GET /PATH with "Range: bytes=A-(A+LEN-1)", A a random
--                         offset in [0, SIZE-LEN], a new one for every request
--   (nothing)             the URL given to wrk, over and over
--
-- At the end it prints one line, "wrk-json {...}", with the figures run.py
-- reads (wrk's own text report, with --latency, comes before it).

local threads = 0

function setup(thread)
   thread:set("id", threads)
   threads = threads + 1
end

local mode, requests, next_request, path, size, len

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
   elseif mode == "range" then
      path = "/" .. args[2]
      size = tonumber(args[3])
      len = tonumber(args[4])
      math.randomseed(1000 + id)
   end
end

function request()
   if mode == "paths" then
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
