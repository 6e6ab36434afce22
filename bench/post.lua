-- wrk script of the tvgate benchmark: POST a body file with Claude Code's headers.
--
-- wrk -s post.lua URL -- BODY_FILE HEADERS_FILE
--   BODY_FILE     the request body; its "@@@@@@@@@@" (if any) becomes a 10-digit sequence
--                 number per request, so no two requests are the same bytes
--   HEADERS_FILE  "Name: value" lines (the token among them when going through tvgate)
-- With BENCH_OVERHEAD=1 in the environment it also reads each response's
-- x-tvgate-overhead-ms header (that makes wrk parse every response: latency runs only).
-- It prints one line "BENCH_JSON {...}" with the figures the harness reads.

local threads = {}
local head, tail, seq = nil, nil, 0

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local f = assert(io.open(args[1], "rb"))
   wrk.body = f:read("*a")
   f:close()
   local first, last = wrk.body:find("@@@@@@@@@@", 1, true)
   if first then
      head, tail = wrk.body:sub(1, first - 1), wrk.body:sub(last + 1)
      -- Runs of one workload follow each other: start each where no earlier one was.
      seq = (os.time() % 100000) * 10000
   end
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

function request()
   if head == nil then
      return wrk.format()
   end
   seq = seq + 1
   return wrk.format(nil, nil, nil, head .. string.format("%010d", seq % 10000000000) .. tail)
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
