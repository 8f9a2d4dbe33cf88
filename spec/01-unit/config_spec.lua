local config = require "moonpost.runtime.config"

describe("moonpost.runtime.config", function()
  local SCHEMA = {
    name = { type = "string", default = "x" },
    count = { type = "posint", default = 3 },
    zero_ok = { type = "nonneg" },
    wait = { type = "duration", default = 300 },
    size = { type = "size" },
    addrs = { type = "list" },
    mode = { type = "enum", values = { "a", "b" } },
    flag = { type = "boolean" },
    fn = { type = "function" },
    needed = { type = "string", required = true },
    even = { type = "number", check = function(v) return v % 2 == 0, "must be even" end },
  }

  it("check() fills defaults and converts values", function()
    local o = config.check("blk", { needed = "y", wait = "5m", size = "2M", addrs = "a:1", even = 4 }, SCHEMA)
    assert.equal("x", o.name)
    assert.equal(3, o.count)
    assert.equal(300, o.wait)
    assert.equal(2 * 1048576, o.size)
    assert.same({ "a:1" }, o.addrs)
    assert.equal(4, o.even)
  end)

  local function err_of(opts)
    local ok, err = pcall(config.check, "blk", opts, SCHEMA)
    assert.is_false(ok)
    return err
  end

  it("check() names the block and field of a bad value", function()
    assert.matches("blk: field 'count': expected a positive integer, got \"lots\"",
      err_of({ needed = "y", count = "lots" }), nil, true)
    assert.matches("blk: field 'count': expected a positive integer, got 0", err_of({ needed = "y", count = 0 }), nil, true)
    assert.matches("field 'wait': expected a duration", err_of({ needed = "y", wait = "soon" }), nil, true)
    assert.matches("field 'mode': expected one of \"a\", \"b\", got \"c\"", err_of({ needed = "y", mode = "c" }), nil, true)
    assert.matches("field 'addrs': item 2: expected a string", err_of({ needed = "y", addrs = { "a", 3 } }), nil, true)
    assert.matches("field 'even': must be even", err_of({ needed = "y", even = 3 }), nil, true)
    assert.matches("blk: field 'needed' is required", err_of({}), nil, true)
    assert.matches("blk: options must be a table", err_of("str"), nil, true)
  end)

  it("check() refuses unknown fields and lists the known ones", function()
    local err = err_of({ needed = "y", cuont = 3 })
    assert.matches("blk: unknown field 'cuont' (known: addrs, count,", err, nil, true)
  end)

  it("check() reports the error at the caller's line", function()
    -- a tail call from the constructor does not lose the position
    local function constructor(opts) return config.check("blk", opts, SCHEMA) end
    local ok, err = pcall(function()
      constructor({ needed = 1 }) -- this line
    end)
    assert.is_false(ok)
    local line = debug.getinfo(1, "l").currentline - 3
    assert.matches("config_spec.lua:" .. line .. ": blk: field 'needed'", err)
  end)

  it("duration() and size() parse units", function()
    assert.equal(0.25, config.duration("250ms"))
    assert.equal(30, config.duration("30s"))
    assert.equal(7200, config.duration("2h"))
    assert.equal(259200, config.duration("3d"))
    assert.equal(12, config.duration(12))
    assert.is_nil(config.duration("3 weeks ago"))
    assert.is_nil(config.duration(-1))
    assert.equal(512 * 1024, config.size("512k"))
    assert.equal(1073741824, config.size("1G"))
    assert.equal(100, config.size(100))
    assert.is_nil(config.size(1.5))
    assert.is_nil(config.size("1T"))
  end)

  it("parse_address() reads host:port, [v6]:port and :port", function()
    assert.same({ "127.0.0.1", 25 }, { config.parse_address("127.0.0.1:25") })
    assert.same({ "::1", 2525 }, { config.parse_address("[::1]:2525") })
    assert.same({ "0.0.0.0", 25 }, { config.parse_address(":25") })
    assert.same({ "0.0.0.0", 587 }, { config.parse_address("587") })
    assert.is_nil(config.parse_address("::1:25"))
    assert.is_nil(config.parse_address("host"))
    assert.is_nil(config.parse_address("h:99999"))
  end)
end)

describe("moonpost.runtime.config defaults", function()
  it("converts defaults like user values", function()
    local o = config.check("blk", {}, {
      age = { type = "duration", default = "5d" },
      size = { type = "size", default = "64M" },
      addrs = { type = "list", default = "a:1" },
    })
    assert.equal(432000, o.age)
    assert.equal(67108864, o.size)
    assert.same({ "a:1" }, o.addrs)
  end)
end)

describe("moonpost.new gc_pause", function()
  local moonpost = require "moonpost"
  local gc = require "moonpost.runtime.gc"
  local saved
  before_each(function() saved = collectgarbage("setpause", 200) end)
  after_each(function() gc.configure(saved, 0) end)

  it("sets the collector's pause: 400 by default, the policy's value when given", function()
    -- (gc_headroom 0: the pause alone, whatever this process's heap holds)
    moonpost.new { spool = false, gc_headroom = 0 }
    -- setpause returns the value it replaces
    assert.equal(400, collectgarbage("setpause", 200))
    moonpost.new { spool = false, gc_pause = 250, gc_headroom = 0 }
    assert.equal(250, collectgarbage("setpause", 200))
  end)

  it("lowers the pause by gc_headroom for a heap that the pause would let grow past it", function()
    local live = collectgarbage("count") * 1024
    moonpost.new { spool = false, gc_headroom = math.floor(live / 2) }
    -- half of what is alive: about 150 %
    local p = collectgarbage("setpause", 200)
    assert.is_true(p >= 140 and p <= 160, "pause " .. p)
  end)

  it("refuses a headroom that is not a size, naming the field", function()
    local ok, err = pcall(moonpost.new, { spool = false, gc_headroom = "lots" })
    assert.is_false(ok)
    assert.matches("moonpost.new: field 'gc_headroom': expected a size", err, nil, true)
  end)

  it("refuses a pause out of range, naming the field", function()
    local ok, err = pcall(moonpost.new, { spool = false, gc_pause = 100 })
    assert.is_false(ok)
    assert.matches("moonpost.new: field 'gc_pause': must be between 110 and 1000", err, nil, true)
  end)
end)

describe("moonpost.new queue domains", function()
  local moonpost = require "moonpost"

  it("keeps per-domain options under the domain's A-label form, lower case", function()
    local mta = moonpost.new { spool = false, queue = { domains = {
      ["Bücher.Example"] = { max_age = "1d" }, ["Example.ORG."] = { retry = { "1m" } } } } }
    local d = mta.opts.queue.domains
    assert.equal(86400, d["xn--bcher-kva.example"].max_age)
    assert.same({ 60 }, d["example.org"].retry)
  end)

  it("refuses a key that is no domain name, naming it", function()
    for _, bad in ipairs({ "", "bad domain!", "*.example.com", "a..b", string.rep("a", 64) .. ".test" }) do
      local ok, err = pcall(moonpost.new, { spool = false, queue = { domains = { [bad] = { max_age = "1d" } } } })
      assert.is_false(ok, bad)
      assert.matches("moonpost.new: queue: field 'domains': " .. string.format("%q", bad) .. " is not a domain name",
        err, nil, true)
    end
  end)
end)

describe("moonpost.new limits", function()
  local moonpost = require "moonpost"

  it("refuses a free-space check interval of 0 and more than 256 workers, naming the field", function()
    local ok, err = pcall(moonpost.new, { spool = { dir = "/nonexistent", check_interval = 0 } })
    assert.is_false(ok)
    assert.matches("field 'check_interval': must be > 0", err, nil, true)
    ok, err = pcall(moonpost.new, { spool = false, workers = 1000000 })
    assert.is_false(ok)
    assert.matches("moonpost.new: field 'workers': must be at most 256", err, nil, true)
    assert.is_truthy(moonpost.new { spool = false, workers = 256 })
  end)
end)
