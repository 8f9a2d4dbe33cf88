-- Regular expressions for policy rules (moonpost.bounce rules, and any block
-- that matches remote replies): a small backtracking engine in Lua, so that
-- rules written for other MTAs (PowerMTA's bounce-category-patterns, KumoMTA's
-- classifier files) carry over without a C dependency.
--
--   local regex = require "moonpost.runtime.regex"
--   local re, err = regex.compile([[^5\d\d .*(user|mailbox) (unknown|not found)]], { icase = true })
--   local s, e = re:find(subject)    -- start and end, or nil (nil, "too complex" past the step budget)
--
-- Syntax (ERE with the common Perl escapes): literals and "\" escapes; "."; classes "[a-z_]",
-- "[^...]" with \d \w \s inside; \d \D \w \W \s \S; \b \B; ^ $; groups "(...)" and "(?:...)";
-- "|"; quantifiers * + ? {n} {n,} {n,m}, each with a lazy "?" form. No captures are reported
-- and there are no backreferences or lookarounds: compile() says so rather than guessing.
--
-- Matching costs at most `budget` steps (default 100000) per find, so a pattern that
-- backtracks badly costs a bounded amount of time on hostile input.
local byte, sub, lower, upper, char, format = string.byte, string.sub, string.lower, string.upper, string.char,
  string.format

local _M = { _VERSION = "0.1" }

local RE = {}
local re_mt = { __index = RE }

-- ---- character tests --------------------------------------------------------------------

local function is_digit(c) return c >= 48 and c <= 57 end
local function is_word(c)
  return c and ((c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122) or c == 95)
end
local function is_space(c) return c == 32 or (c >= 9 and c <= 13) end
local CLASS = {
  d = is_digit, w = is_word, s = is_space,
  D = function(c) return not is_digit(c) end,
  W = function(c) return not is_word(c) end,
  S = function(c) return not is_space(c) end,
}
local ESCAPE = { t = 9, n = 10, r = 13, f = 12, v = 11 }

-- ---- parser: pattern -> tree ----------------------------------------------------------------
-- Nodes: { "char", byte } { "any" } { "set", test } { "bol" } { "eol" } { "wordb", negated }
-- { "seq", n1, n2, ... } { "alt", n1, n2, ... } { "rep", node, min, max|nil, lazy }

local Parser = {}
Parser.__index = Parser

-- perr(p, msg, [back]): a syntax error at the current position, or `back`
-- characters before it (the character just read)
local function perr(p, msg, back)
  error({ regex_error = format("%s at position %d", msg, p.pos - (back or 0)) }, 0)
end

function Parser:peek(k) return sub(self.src, self.pos + (k or 0), self.pos + (k or 0)) end
function Parser:take()
  local c = sub(self.src, self.pos, self.pos)
  if c ~= "" then self.pos = self.pos + 1 end
  return c
end

-- escape after "\" -> node
function Parser:escape(in_set)
  local c = self:take()
  if c == "" then perr(self, "trailing backslash") end
  if CLASS[c] then return { "set", CLASS[c] } end
  if not in_set and (c == "b" or c == "B") then return { "wordb", c == "B" } end
  if c:match("%d") then perr(self, "backreferences are not supported", 1) end
  if ESCAPE[c] then return { "char", ESCAPE[c] } end
  if c:match("%a") then perr(self, "unknown escape \\" .. c, 1) end
  return { "char", byte(c) }
end

function Parser:set()
  local negated = false
  if self:peek() == "^" then
    negated = true
    self.pos = self.pos + 1
  end
  local tests, ranges = {}, {}
  local first = true
  while true do
    local c = self:take()
    if c == "" then perr(self, "missing ]") end
    if c == "]" and not first then break end
    first = false
    local lo
    if c == "\\" then
      local n = self:escape(true)
      if n[1] == "set" then tests[#tests + 1] = n[2] else lo = n[2] end
    elseif c == "[" and self:peek() == ":" then
      perr(self, "POSIX classes like [:alpha:] are not supported (use \\w, \\d, \\s)", 1)
    else
      lo = byte(c)
    end
    if lo then
      local hi = lo
      if self:peek() == "-" and self:peek(1) ~= "]" and self:peek(1) ~= "" then
        self.pos = self.pos + 1
        local h = self:take()
        if h == "\\" then
          local n = self:escape(true)
          if n[1] ~= "char" then perr(self, "bad range") end
          hi = n[2]
        else
          hi = byte(h)
        end
        if hi < lo then perr(self, "range out of order", 1) end
      end
      ranges[#ranges + 1] = { lo, hi }
    end
  end
  local icase = self.icase
  local function has(c)
    for i = 1, #ranges do
      local r = ranges[i]
      if c >= r[1] and c <= r[2] then return true end
    end
    for i = 1, #tests do if tests[i](c) then return true end end
    return false
  end
  local test
  if icase then
    test = function(c)
      local ch = char(c)
      return has(c) or has(byte(lower(ch))) or has(byte(upper(ch)))
    end
  else
    test = has
  end
  if negated then return { "set", function(c) return not test(c) end } end
  return { "set", test }
end

function Parser:atom()
  local c = self:take()
  if c == "(" then
    if self:peek() == "?" then
      if self:peek(1) ~= ":" then perr(self, "only (?:...) groups are supported") end
      self.pos = self.pos + 2
    end
    local n = self:alt()
    if self:peek() ~= ")" then perr(self, "missing )") end
    self.pos = self.pos + 1
    return n
  elseif c == "[" then return self:set()
  elseif c == "." then return { "any" }
  elseif c == "^" then return { "bol" }
  elseif c == "$" then return { "eol" }
  elseif c == "\\" then return self:escape(false)
  elseif c == "*" or c == "+" or c == "?" then perr(self, "nothing to repeat", 1)
  end
  local b = byte(c)
  if self.icase then b = byte(lower(c)) end
  return { "char", b }
end

-- {n}, {n,}, {n,m} at the current position -> min, max | nil (a literal "{")
function Parser:braces()
  local n, m, close = self.src:match("^{(%d+)(,?%d*)}()", self.pos)
  if not n then return nil end
  n = tonumber(n)
  local max
  if m == "" then max = n elseif m == "," then max = nil else max = tonumber(m:sub(2)) end
  if max and max < n then perr(self, "bad repeat {n,m}") end
  if n > 1000 or (max and max > 1000) then perr(self, "repeat count over 1000") end
  self.pos = close
  return n, max, true
end

function Parser:seq()
  local items = { "seq" }
  while true do
    local c = self:peek()
    if c == "" or c == "|" or c == ")" then break end
    local node = self:atom()
    while true do
      local q = self:peek()
      local min, max, ok
      if q == "*" then min, max, ok = 0, nil, true
      elseif q == "+" then min, max, ok = 1, nil, true
      elseif q == "?" then min, max, ok = 0, 1, true
      elseif q == "{" then
        min, max, ok = self:braces()
        if ok then self.pos = self.pos - 1 end
      end
      if not ok then break end
      if node[1] == "bol" or node[1] == "eol" or node[1] == "wordb" then perr(self, "nothing to repeat") end
      self.pos = self.pos + 1
      local lazy = false
      if self:peek() == "?" then
        lazy = true
        self.pos = self.pos + 1
      end
      node = { "rep", node, min, max, lazy }
    end
    items[#items + 1] = node
  end
  return items
end

function Parser:alt()
  local first = self:seq()
  if self:peek() ~= "|" then return first end
  local alts = { "alt", first }
  while self:peek() == "|" do
    self.pos = self.pos + 1
    alts[#alts + 1] = self:seq()
  end
  return alts
end

-- ---- matcher: tree -> function(s, i, k) -> end | nil ----------------------------------------
-- Continuation passing: each matcher calls k(j) with the position after
-- its match and returns what k returns, so alternatives and repeats
-- backtrack by trying the next choice when k fails.

local function build(node, st)
  local t = node[1]
  if t == "char" then
    local b = node[2]
    return function(s, i, k)
      st.steps = st.steps + 1
      if byte(s, i) == b then return k(i + 1) end
    end, function(c) return c == b end
  elseif t == "any" then
    return function(s, i, k)
      st.steps = st.steps + 1
      if i <= #s then return k(i + 1) end
    end, function() return true end
  elseif t == "set" then
    local test = node[2]
    return function(s, i, k)
      st.steps = st.steps + 1
      local c = byte(s, i)
      if c and test(c) then return k(i + 1) end
    end, test
  elseif t == "bol" then
    return function(_, i, k) if i == 1 then return k(i) end end
  elseif t == "eol" then
    return function(s, i, k) if i == #s + 1 then return k(i) end end
  elseif t == "wordb" then
    local negated = node[2]
    return function(s, i, k)
      local at = (is_word(byte(s, i - 1)) and true or false) ~= (is_word(byte(s, i)) and true or false)
      if at ~= negated then return k(i) end
    end
  elseif t == "seq" then
    local fs = {}
    for n = 2, #node do fs[#fs + 1] = (build(node[n], st)) end
    if #fs == 0 then return function(_, i, k) return k(i) end end
    if #fs == 1 then return fs[1] end
    local function run(idx, s, i, k)
      if idx > #fs then return k(i) end
      return fs[idx](s, i, function(j) return run(idx + 1, s, j, k) end)
    end
    return function(s, i, k) return run(1, s, i, k) end
  elseif t == "alt" then
    local fs = {}
    for n = 2, #node do fs[#fs + 1] = (build(node[n], st)) end
    return function(s, i, k)
      for n = 1, #fs do
        local r = fs[n](s, i, k)
        if r then return r end
      end
    end
  elseif t == "rep" then
    local f, single = build(node[2], st)
    local min, max, lazy = node[3], node[4], node[5]
    if single then
      -- one character per iteration: count the run, then back off without recursion
      return function(s, i, k)
        local n, limit = 0, max or math.huge
        while n < limit do
          local c = byte(s, i + n)
          if not c or not single(c) then break end
          n = n + 1
        end
        st.steps = st.steps + n
        if n < min then return nil end
        if lazy then
          for m = min, n do
            st.steps = st.steps + 1
            if st.steps > st.budget then error(st) end
            local r = k(i + m)
            if r then return r end
          end
        else
          for m = n, min, -1 do
            st.steps = st.steps + 1
            if st.steps > st.budget then error(st) end
            local r = k(i + m)
            if r then return r end
          end
        end
      end
    end
    local function try(s, j, n, k)
      st.steps = st.steps + 1
      if st.steps > st.budget then error(st) end
      local more = not max or n < max
      local function again(j2)
        if j2 == j and n >= min then return nil end -- an empty iteration: no progress, stop
        return try(s, j2, n + 1, k)
      end
      if lazy then
        if n >= min then
          local r = k(j)
          if r then return r end
        end
        if more then return f(s, j, again) end
        return nil
      end
      if more then
        local r = f(s, j, again)
        if r then return r end
      end
      if n >= min then return k(j) end
    end
    return function(s, i, k) return try(s, i, 0, k) end
  end
  error("regex: unknown node " .. tostring(t))
end

-- compile(pattern, [opts]) -> re | nil, err. opts: icase (match without
-- regard to ASCII letter case), budget (steps per find).
function _M.compile(pattern, opts)
  if type(pattern) ~= "string" then return nil, "expected a string" end
  opts = opts or {}
  local p = setmetatable({ src = pattern, pos = 1, icase = opts.icase }, Parser)
  local ok, tree = pcall(function()
    local t = p:alt()
    if p.pos <= #pattern then perr(p, "unmatched )") end
    return t
  end)
  if not ok then
    if type(tree) == "table" and tree.regex_error then return nil, tree.regex_error end
    error(tree, 0)
  end
  local st = { steps = 0, budget = opts.budget or 100000 }
  local f = build(tree, st)
  local anchored = tree[1] == "seq" and tree[2] and tree[2][1] == "bol"
  return setmetatable({ pattern = pattern, f = f, st = st, icase = opts.icase, anchored = anchored }, re_mt)
end

local function done(j) return j end

-- re:find(s, [init]) -> start, end | nil | nil, "too complex"
function RE:find(s, init)
  if self.icase then s = lower(s) end
  local st, f = self.st, self.f
  st.steps = 0
  local last = self.anchored and 1 or #s + 1
  for start = init or 1, last do
    local ok, e = pcall(f, s, start, done)
    if not ok then
      if e == st then return nil, "too complex" end
      error(e, 0)
    end
    if e then return start, e - 1 end
  end
  return nil
end

-- re:test(s) -> true | false
function RE:test(s)
  return self:find(s) ~= nil
end

return _M
