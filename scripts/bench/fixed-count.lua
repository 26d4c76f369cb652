-- wrk script for scripts/bench-memory-footprint: POST a small JSON body with a fresh
-- Idempotency-Key, each wrk thread stopping after a fixed number of responses.
-- Arguments (after `--`): <prefix> <responses per thread>

local next_thread = 0
function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

local prefix, limit, counter, answered = "fixed", 100000, 0, 0
local body = '{"amount":100,"currency":"eur","note":"idemgate benchmark"}'
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  prefix = args[1] or prefix
  limit = tonumber(args[2] or limit)
end

function request()
  counter = counter + 1
  headers["Idempotency-Key"] = string.format("%s-%d-%d", prefix, tid, counter)
  return wrk.format("POST", "/orders", headers, body)
end

function response()
  answered = answered + 1
  if answered >= limit then
    wrk.thread:stop()
  end
end
