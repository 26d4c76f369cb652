-- wrk script for scripts/bench-proxy: POST a small JSON body with an Idempotency-Key.
-- Arguments (after `--`): <prefix> <mode>
--   mode "unique": every request gets a fresh key (each one executes upstream).
--   mode "replay": each thread cycles through 64 keys, so after the warm-up pass (run with the
--                  same prefix) every request is a replay of a completed record.
--   mode "nokey":  no Idempotency-Key at all, so idemgate passes the request through (the cost
--                  of its HTTP server and client alone).
-- wrk gives each thread its own Lua state, so counters need no locking; `setup` numbers the
-- threads so keys never collide between them.

local next_thread = 0
function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

local prefix, mode, counter = "bench", "unique", 0
local body = '{"amount":100,"currency":"eur","note":"idemgate benchmark"}'
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  prefix = args[1] or prefix
  mode = args[2] or mode
end

function request()
  counter = counter + 1
  local n = counter
  if mode == "replay" then
    n = counter % 64
  end
  if mode ~= "nokey" then
    headers["Idempotency-Key"] = string.format("%s-%d-%d", prefix, tid, n)
  end
  return wrk.format("POST", "/orders", headers, body)
end

-- Print only what the driver parses: total requests, duration, and non-2xx answers.
function done(summary, latency, requests)
  io.write(string.format("BENCH requests=%d duration_us=%d errors=%d non2xx=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
