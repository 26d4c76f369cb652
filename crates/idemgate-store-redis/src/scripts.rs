//! The Lua scripts: each store operation is one `EVALSHA` of one of these.
//!
//! A record is one hash at `KEYS[1]`:
//!
//! | field | InFlight | Completed |
//! |---|---|---|
//! | `v` | format version | format version |
//! | `s` | `i` | `c` |
//! | `fp` | fingerprint (32 bytes) | fingerprint |
//! | `tok` | the holder's token (16 bytes) | `origin_token` |
//! | `lx` | lease end, ms, server `TIME` | — |
//! | `h` | holder (decimal) | — |
//! | `r` | retention (ms) for a placeholder, and for the key's TTL beyond the lease | — |
//! | `o` | — | [`Outcome::encode`](idemgate::record::Outcome::encode) bytes |
//! | `x` | — | `expires_at`, ms |
//! | `u` | — | `1` for an outcome-unknown placeholder (what `resolve` looks for) |
//!
//! Every script starts with the same `load()` that validates the hash; anything else in the
//! slot (another type, a missing field, an unknown version) makes the script answer
//! `{'E', reason}`, which the client turns into `StoreError::Corrupt`: never `Acquired`.
//!
//! Numbers travel as decimal strings: Lua 5.1 numbers are doubles, which hold millisecond
//! timestamps exactly, but an integer reply would truncate and `tostring` may use exponents.
//! Durations are clamped on the Rust side so sums stay far below 2^53.
//!
//! Common ARGV: `ARGV[1]` the current format version, `ARGV[2]` the previous one (both
//! accepted), `ARGV[3]` the publish command (`PUBLISH` or `SPUBLISH`), `ARGV[4]` the channel.
//! Operation arguments start at `ARGV[5]`.

const PRELUDE: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local key = KEYS[1]
local VCUR, VPREV, PUBCMD, CHAN = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function fmt(n) return string.format('%d', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function publish(what)
  redis.call(PUBCMD, CHAN, what)
end
local function load()
  local ty = redis.call('TYPE', key)
  if type(ty) == 'table' then ty = ty['ok'] end
  if ty == 'none' then return nil, nil end
  if ty ~= 'hash' then return nil, 'the key holds a ' .. tostring(ty) .. ', not an idemgate record' end
  local f = redis.call('HMGET', key, 'v', 's', 'fp', 'tok', 'lx', 'h', 'r', 'o', 'x', 'u')
  local r = {v = f[1], s = f[2], fp = f[3], tok = f[4], lx = f[5], h = f[6], r = f[7], o = f[8], x = f[9], u = f[10]}
  if r.v ~= VCUR and r.v ~= VPREV then return nil, 'record format version ' .. tostring(r.v) .. ' is not readable by this build' end
  if type(r.fp) ~= 'string' or #r.fp ~= 32 then return nil, 'record has no valid fingerprint' end
  if type(r.tok) ~= 'string' or #r.tok ~= 16 then return nil, 'record has no valid token' end
  if r.s == 'i' then
    r.lx = tonumber(r.lx)
    r.r = tonumber(r.r)
    if not r.lx or not r.r or type(r.h) ~= 'string' then return nil, 'in-flight record has missing fields' end
  elseif r.s == 'c' then
    r.x = tonumber(r.x)
    if not r.x or type(r.o) ~= 'string' then return nil, 'completed record has missing fields' end
  else
    return nil, 'record has an unknown state'
  end
  return r, nil
end
-- Writes before deletes: under maxmemory the first write is refused (OOM) and the script stops
-- with the old record intact; HDEL never fails for memory.
local function write_inflight(fp, tok, lx, holder, retention, lease)
  redis.call('HSET', key, 'v', VCUR, 's', 'i', 'fp', fp, 'tok', tok, 'lx', fmt(lx), 'h', holder, 'r', fmt(retention))
  redis.call('HDEL', key, 'o', 'x', 'u')
  redis.call('PEXPIRE', key, lease + retention)
end
local function write_completed(fp, tok, o, x, u, ttl)
  redis.call('HSET', key, 'v', VCUR, 's', 'c', 'fp', fp, 'tok', tok, 'o', o, 'x', fmt(x), 'u', u)
  redis.call('HDEL', key, 'lx', 'h', 'r')
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', key, ttl)
end
"#;

/// ARGV[5..]: fingerprint, token, lease ms, retention ms, holder, re-execute (`1`/`0`),
/// encoded outcome-unknown placeholder.
///
/// Answers: `{'A', lease_end}` acquired (`wrote` = `1` when this call wrote it), `{'I', lease_end}`,
/// `{'C', fp, origin_token, expires_at, outcome}`, `{'M'}`, `{'E', reason}`.
const ACQUIRE: &str = r#"
local fp, tok, lease, retention, holder, reexec, unknown = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10], ARGV[11]
local r, err = load()
if err then return {'E', err} end
local now = now_ms()
local function fresh()
  local lx = now + lease
  write_inflight(fp, tok, lx, holder, retention, lease)
  return {'A', fmt(lx), '1'}
end
if not r then return fresh() end
if r.s == 'c' then
  if r.x <= now then return fresh() end
  if r.fp ~= fp then return {'M'} end
  return {'C', r.fp, r.tok, fmt(r.x), r.o}
end
if r.tok == tok then return {'A', fmt(r.lx), '0'} end
if r.lx <= now then
  if reexec == '1' then return fresh() end
  local x = now + retention
  write_completed(r.fp, r.tok, unknown, x, '1', retention)
  publish('u')
  if r.fp ~= fp then return {'M'} end
  return {'C', r.fp, r.tok, fmt(x), unknown}
end
if r.fp ~= fp then return {'M'} end
return {'I', fmt(r.lx)}
"#;

/// ARGV[5..]: token, lease ms. Answers `{'R', lease_end}` or `{'F'}`.
const RENEW: &str = r#"
local tok, lease = ARGV[5], tonumber(ARGV[6])
local r, err = load()
if err then return {'E', err} end
if r and r.s == 'i' and r.tok == tok then
  local lx = now_ms() + lease
  redis.call('HSET', key, 'lx', fmt(lx))
  redis.call('PEXPIRE', key, lease + r.r)
  return {'R', fmt(lx)}
end
return {'F'}
"#;

/// ARGV[5..]: token, outcome bytes, ttl ms, outcome-unknown flag. Answers `{'S', wrote}` or
/// `{'F'}`.
///
/// Absent: `Stored` without writing, since `complete` carries no fingerprint to build a record
/// from (the record was released, deleted or expired after an absence longer than lease plus
/// retention).
const COMPLETE: &str = r#"
local tok, o, ttl, u = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local r, err = load()
if err then return {'E', err} end
if not r then return {'S', '0'} end
if r.tok ~= tok then return {'F'} end
write_completed(r.fp, tok, o, now_ms() + ttl, u, ttl)
publish('c')
return {'S', '1'}
"#;

/// ARGV[5..]: token. Answers `{'D', wrote}` or `{'F'}`.
///
/// Deletes InFlight(token) only. A Completed record is never released, not even the
/// outcome-unknown placeholder of this token's own lapsed lease: a duplicate may already have
/// been told that the outcome is unknown, and a fresh execution would contradict it.
const RELEASE: &str = r#"
local tok = ARGV[5]
local r, err = load()
if err then return {'E', err} end
if not r then return {'D', '0'} end
if r.s == 'i' and r.tok == tok then
  redis.call('DEL', key)
  publish('r')
  return {'D', '1'}
end
return {'F'}
"#;

/// No operation arguments. Answers `{'N'}`, `{'I', fp, tok, lease_end, holder}`,
/// `{'C', fp, origin_token, expires_at, outcome}` or `{'E', reason}`.
const GET: &str = r#"
local r, err = load()
if err then return {'E', err} end
if not r then return {'N'} end
if r.s == 'i' then return {'I', r.fp, r.tok, fmt(r.lx), r.h} end
return {'C', r.fp, r.tok, fmt(r.x), r.o}
"#;

/// ARGV[5..]: force (`1`/`0`). Answers `{'N'}`, `{'D'}`, `{'P'}` (in flight, needs force), or
/// `{'E', reason}` for an unreadable record without force (with force it is deleted: that is the
/// operator's way out of garbage).
const DELETE: &str = r#"
local force = ARGV[5]
if redis.call('EXISTS', key) == 0 then return {'N'} end
local r, err = load()
if err and force ~= '1' then return {'E', err} end
if r and r.s == 'i' and force ~= '1' then return {'P'} end
redis.call('DEL', key)
publish('d')
return {'D'}
"#;

/// ARGV[5..]: mode (`release`/`respond`), outcome bytes, ttl ms, outcome-unknown flag, the
/// operator's fresh origin token (its answer is final: the lapsed holder's late `complete` is
/// fenced).
/// Answers `{'N'}`, `{'U'}` (not an outcome-unknown placeholder), `{'OK'}`, `{'E', reason}`.
const RESOLVE: &str = r#"
local mode, o, ttl, u, origin = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9]
local r, err = load()
if err then return {'E', err} end
if not r then return {'N'} end
if r.s ~= 'c' or r.u ~= '1' then return {'U'} end
if mode == 'release' then
  redis.call('DEL', key)
else
  write_completed(r.fp, origin, o, now_ms() + ttl, u, ttl)
end
publish('s')
return {'OK'}
"#;

/// One script: its source and SHA-1 (for `EVALSHA`).
#[derive(Debug)]
pub(crate) struct Lua {
    pub(crate) source: String,
    pub(crate) hash: String,
}

impl Lua {
    fn new(body: &str) -> Self {
        let source = format!("{PRELUDE}{body}");
        let hash = redis::Script::new(&source).get_hash().to_owned();
        Lua { source, hash }
    }
}

/// All scripts, built once per store.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) acquire: Lua,
    pub(crate) renew: Lua,
    pub(crate) complete: Lua,
    pub(crate) release: Lua,
    pub(crate) get: Lua,
    pub(crate) delete: Lua,
    pub(crate) resolve: Lua,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            acquire: Lua::new(ACQUIRE),
            renew: Lua::new(RENEW),
            complete: Lua::new(COMPLETE),
            release: Lua::new(RELEASE),
            get: Lua::new(GET),
            delete: Lua::new(DELETE),
            resolve: Lua::new(RESOLVE),
        }
    }
}
