-- Token buckets, for every rate limit (tenants' inbound budgets,
-- moonpost.shape's gates): `cap` tokens at most, refilled continuously at
-- `r` tokens a second; the caller takes tokens by lowering b.tokens.
--
--   local b = bucket.new(100, 10, now)     -- 100/s, bursts of 10
--   if bucket.refill(b, now) >= 1 then b.tokens = b.tokens - 1 end
local _M = { _VERSION = "0.1" }

-- new(r, cap, t) -> a full bucket at time t (seconds)
function _M.new(r, cap, t)
  return { r = r, cap = cap, tokens = cap, t = t }
end

-- refill(b, t) -> the tokens in b at time t (seconds, not before the last call)
function _M.refill(b, t)
  local tok = b.tokens + (t - b.t) * b.r
  if tok > b.cap then tok = b.cap end
  b.tokens, b.t = tok, t
  return tok
end

return _M
