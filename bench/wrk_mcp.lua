-- wrk script for bench/wrkload.py: one MCP session per wrk thread (run
-- wrk with as many threads as connections), each thread sending
-- tools/call echo requests one at a time on its session.
--
--   wrk -t N -c N -d 10s -s bench/wrk_mcp.lua http://127.0.0.1:PORT/mcp \
--       -- PROTOCOL TOKEN SESSION_1 ... SESSION_N
--
-- TOKEN is "-" for a bridge without authentication.  With PROTOCOL
-- 2026-07-28 the requests are stateless: no session (the SESSION arguments
-- are placeholders, one per thread), the envelope in _meta and the routing
-- headers instead.  Every answer is checked: status 200 and the request's
-- own id in the body, else it counts as bad.  done() prints one JSON line
-- for wrkload.py.

local sessions = {}
local threads = {}
local created = 0

function setup(thread)
   created = created + 1
   thread:set("index", created)
   table.insert(threads, thread)
end

-- Globals: done() reads bad and first_bad with thread:get.
id = 0
bad = 0
first_bad = ""
local path
local meta = ""

function init(args)
   local protocol, token = args[1], args[2]
   local session = args[2 + index]
   if session == nil then
      error("more wrk threads than session ids")
   end
   path = wrk.path
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Accept"] = "application/json, text/event-stream"
   wrk.headers["MCP-Protocol-Version"] = protocol
   if protocol == "2026-07-28" then
      wrk.headers["Mcp-Method"] = "tools/call"
      wrk.headers["Mcp-Name"] = "echo"
      meta = ',"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",' ..
         '"io.modelcontextprotocol/clientCapabilities":{}}'
   else
      wrk.headers["Mcp-Session-Id"] = session
   end
   if token ~= "-" then
      wrk.headers["Authorization"] = "Bearer " .. token
   end
end

function request()
   id = id + 1
   return wrk.format(nil, path, nil,
      '{"jsonrpc":"2.0","id":' .. id .. ',"method":"tools/call",' ..
      '"params":{"name":"echo","arguments":{"text":"hello, bench"}' .. meta .. '}}')
end

function response(status, headers, body)
   -- The answer to the request just sent (one in flight per connection).
   if status ~= 200 or not string.find(body, '"id"%s*:%s*' .. id .. '%s*[,}]') then
      bad = bad + 1
      if first_bad == "" then
         first_bad = status .. " " .. string.sub(body, 1, 200)
      end
   end
end

local function quote(s)
   return '"' .. string.gsub(s, '[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end) .. '"'
end

function done(summary, latency, requests)
   local total_bad = 0
   local sample = ""
   for _, thread in ipairs(threads) do
      total_bad = total_bad + thread:get("bad")
      local one = thread:get("first_bad")
      if sample == "" and one ~= "" then
         sample = one
      end
   end
   local e = summary.errors
   io.write(string.format(
      '{"requests":%d,"duration_us":%d,"bad":%d,"connect":%d,"read":%d,"write":%d,' ..
      '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
      '"max_us":%d,"mean_us":%.1f,"first_bad":%s}\n',
      summary.requests, summary.duration, total_bad, e.connect, e.read, e.write,
      e.status, e.timeout, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean,
      quote(sample)))
end
