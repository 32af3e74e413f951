-- wrk script: POST a JSON body from a file; print the results as one JSON line.
--
--   wrk -t1 -c32 -d10s -s benchmarks/wrk_post.lua http://127.0.0.1:8080/v1/chat/completions \
--       -- body.json "Authorization: Bearer sk-..."
--
-- Arguments after "--": the body file, then any number of "Name: value" headers.
-- The last line of output is "BENCH_JSON {...}" with counts, errors, latency
-- percentiles in microseconds and the whole latency histogram as [us, count]
-- pairs, so that run.py can merge several runs exactly.

function init(args)
   local path = args[1]
   if path == nil then
      error("usage: wrk ... -s wrk_post.lua URL -- BODY_FILE [Header: value ...]")
   end
   local f = assert(io.open(path, "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   for i = 2, #args do
      local name, value = args[i]:match("^([^:]+):%s*(.*)$")
      if name then
         wrk.headers[name] = value
      end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local hist = {}
   for i = 1, #latency do
      local value, count = latency(i)
      hist[#hist + 1] = string.format("[%d,%d]", value, count)
   end
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.2f,"stdev":%.2f,"max":%d,' ..
      '"p50":%d,"p90":%d,"p99":%d,"p999":%d},"hist":[%s]}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      table.concat(hist, ",")))
end
