-- wrk script of the tvgate benchmark: POST a body file with Claude Code's headers.
--
-- wrk -s post.lua URL -- BODY_FILE HEADERS_FILE
--   BODY_FILE     the request body, sent as is
--   HEADERS_FILE  "Name: value" lines (the token among them when going through tvgate)
-- With BENCH_OVERHEAD=1 in the environment it also reads each response's
-- x-tvgate-overhead-ms header (that makes wrk parse every response: latency runs only).
-- It prints one line "BENCH_JSON {...}" with the figures the harness reads.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local f = assert(io.open(args[1], "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.method = "POST"
   for line in io.lines(args[2]) do
      local name, value = line:match("^([^:]+):%s*(.*)$")
      if name then
         wrk.headers[name] = value
      end
   end
   statuses = {}
   overheads = {}
end

if os.getenv("BENCH_OVERHEAD") == "1" then
   function response(status, headers, body)
      local v = headers["x-tvgate-overhead-ms"] or headers["X-Tvgate-Overhead-Ms"]
      if v then
         overheads[#overheads + 1] = tonumber(v)
      end
   end
end

local function percentile(sorted, p)
   if #sorted == 0 then
      return 0
   end
   local i = math.max(1, math.ceil(#sorted * p / 100))
   return sorted[i]
end

function done(summary, latency, requests)
   local all = {}
   for _, t in ipairs(threads) do
      local o = t:get("overheads")
      if o then
         for _, v in ipairs(o) do
            all[#all + 1] = v
         end
      end
   end
   table.sort(all)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,'
         .. '"lat_p50_us":%.1f,"lat_p90_us":%.1f,"lat_p99_us":%.1f,"lat_mean_us":%.1f,"lat_max_us":%.1f,'
         .. '"overhead_n":%d,"overhead_p50_ms":%.4f,"overhead_p99_ms":%.4f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
      #all, percentile(all, 50), percentile(all, 99)))
end
