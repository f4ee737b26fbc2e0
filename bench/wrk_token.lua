-- wrk script for bench/bench_store.py: refresh-token grants at
-- POST /oauth/token, one chain per wrk thread (run wrk with as many threads
-- as connections), one request in flight per chain.
--
--   wrk -t N -c N -d 5s -s bench/wrk_token.lua http://127.0.0.1:PORT/oauth/token \
--       -- CLIENT_1 REFRESH_1 ... CLIENT_N REFRESH_N
--
-- Each chain starts from its own grant's refresh token and presents its
-- grant's client id (the same one for every chain when they share a
-- client); every answer must be 200 with a new refresh token, which the
-- chain's next request presents (the broker rotates the refresh token on
-- every grant).  Anything else counts as bad, and the chain then keeps
-- presenting its last good token (refused from then on: a broken chain
-- shows as bad answers, never as grants).  Each request carries its own
-- X-Forwarded-For address: the broker trusts 127.0.0.1 as a proxy in this
-- benchmark, so every request gets a fresh bucket of the per-address rate
-- limit of /oauth/token.
-- done() prints one JSON line for bench_store.py.

local threads = {}
local created = 0

function setup(thread)
   created = created + 1
   thread:set("index", created)
   table.insert(threads, thread)
end

-- Globals: done() reads them with thread:get.
bad = 0
grants = 0
first_bad = ""
local client_id
local refresh
local path
local sent = 0

local function form(s)
   return (string.gsub(s, "[^%w%-%._~]", function(c)
      return string.format("%%%02X", string.byte(c))
   end))
end

function init(args)
   client_id = args[2 * index - 1]
   refresh = args[2 * index]
   if refresh == nil then
      error("more wrk threads than chains")
   end
   if index > 150 then
      error("at most 150 chains (one X-Forwarded-For range each)")
   end
   path = wrk.path
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
   wrk.headers["Accept"] = "application/json"
end

-- wrk calls request() once more than it sends (to check the script), so
-- it changes nothing but the address counter; the chain moves on in
-- response() only.
function request()
   sent = sent + 1
   wrk.headers["X-Forwarded-For"] = string.format(
      "10.%d.%d.%d", 100 + index, math.floor(sent / 256) % 256, sent % 256)
   return wrk.format(nil, path, nil,
      "grant_type=refresh_token&refresh_token=" .. form(refresh) ..
      "&client_id=" .. form(client_id))
end

function response(status, headers, body)
   -- The answer to the request just sent (one in flight per connection).
   local new = nil
   if status == 200 then
      new = string.match(body, '"refresh_token"%s*:%s*"([^"]+)"')
   end
   if new == nil or new == refresh then
      bad = bad + 1
      if first_bad == "" then
         first_bad = status .. " " .. string.sub(body, 1, 200)
      end
   else
      grants = grants + 1
      refresh = new
   end
end

local function quote(s)
   return '"' .. string.gsub(s, '[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end) .. '"'
end

function done(summary, latency, requests)
   local total_bad = 0
   local total_grants = 0
   local sample = ""
   for _, thread in ipairs(threads) do
      total_bad = total_bad + thread:get("bad")
      total_grants = total_grants + thread:get("grants")
      local one = thread:get("first_bad")
      if sample == "" and one ~= "" then
         sample = one
      end
   end
   local e = summary.errors
   io.write(string.format(
      '{"requests":%d,"grants":%d,"duration_us":%d,"bad":%d,"connect":%d,"read":%d,' ..
      '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
      '"p999_us":%d,"max_us":%d,"mean_us":%.1f,"first_bad":%s}\n',
      summary.requests, total_grants, summary.duration, total_bad, e.connect, e.read,
      e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean,
      quote(sample)))
end
