-- moonpost.suppress on a real loop: RCPT refusals per tenant over loopback,
-- queue-time drops and automatic adds with deliveries to the programmable
-- sink, CSV export and import, compaction through the thread pool, and
-- entries that survive SIGKILL of a launched `moonpost run`.
local H = require "helpers"
local core = require "moonpost.core.suppress"

local suppress = require "moonpost.suppress"

-- the tenant is the sender's domain: set by a hook that runs before the block's
local function tenant_from_sender(m)
  m:on("smtp_server_mail_from", function(txn, path)
    if path.domain ~= "" and path.domain ~= "none.test" then txn.tenant = path.domain:lower() end
  end)
end

local with_sink = H.with_sink

-- MAIL FROM:<from>, then each RCPT: the replies as "code enhanced text"
local function rcpts(port, from, list)
  local p = assert(H.connect(port))
  p:expect(220)
  p:cmd("EHLO client.test")
  p:expect(250)
  p:cmd("MAIL FROM:<" .. from .. ">")
  p:expect(250)
  local out = {}
  for i, r in ipairs(list) do
    p:cmd("RCPT TO:<" .. r .. ">")
    local c, e, t = p:reply()
    out[i] = string.format("%s %s %s", tostring(c), tostring(e), tostring(t))
  end
  p:cmd("QUIT")
  p:reply()
  p:close()
  return out
end

local function relay_mta(dir, sink_port, sup, extra)
  return H.start_mta({}, function(m)
    tenant_from_sender(m)
    m:use(sup)
    m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink_port, idle_timeout = "1s" })
    if extra then extra(m) end
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" } } })
end

local function stop(mta, sup)
  H.stop_mta(mta)
  assert.is_true(H.wait_for(function() return not sup:is_open() end, 10), "the store closed")
end

describe("moonpost.suppress", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-suppress") end)
  after_each(function() H.rm_rf(dir) end)

  it("refuses a tenant's suppressed recipient at RCPT with 550 5.7.1, and only for that tenant", function()
    H.run(function()
      local sup = suppress.setup { path = dir .. "/suppress" }
      local mta, port = H.start_mta({}, function(m)
        tenant_from_sender(m)
        m:use(sup)
      end)
      assert.is_true(sup:is_open())
      assert.is_true(sup:add("a.example", "Blocked@Dest.test", "manual"))
      assert.is_true(sup:add(nil, "notenant@dest.test", "manual"))
      local a = rcpts(port, "x@a.example", { "blocked@dest.test", "BLOCKED@dest.TEST", "other@dest.test",
        "notenant@dest.test" })
      assert.equal("550 5.7.1 BLOCKED@dest.TEST is on the suppression list", a[2])
      assert.same({ "550 5.7.1 blocked@dest.test is on the suppression list", a[2], "250 2.1.5 Ok",
        "250 2.1.5 Ok" }, a)
      -- the same address for another tenant, and for mail with no tenant
      assert.same({ "250 2.1.5 Ok", "250 2.1.5 Ok" }, rcpts(port, "x@b.example", { "blocked@dest.test",
        "notenant@dest.test" }))
      assert.same({ "250 2.1.5 Ok", "550 5.7.1 notenant@dest.test is on the suppression list" },
        rcpts(port, "x@none.test", { "blocked@dest.test", "notenant@dest.test" }))
      -- removed: accepted again
      assert.is_true(sup:remove("a.example", "blocked@dest.test"))
      assert.same({ "250 2.1.5 Ok" }, rcpts(port, "x@a.example", { "blocked@dest.test" }))
      assert.truthy(H.log("to=<BLOCKED@dest.TEST> refused: on the suppression list of tenant \"a.example\""))
      assert.equal(3, sup:stats().refused)
      stop(mta, sup)
    end)
  end)

  it("holds an internationalized domain's two forms as one address", function()
    H.run(function()
      local sup = suppress.setup { path = dir .. "/suppress", check = "none" }
      local mta = H.start_mta({}, function(m) m:use(sup) end)
      assert.is_true(sup:add("t", "bob@b\xc3\xbccher.example", "manual"))
      assert.equal("manual", sup:check("t", "bob@xn--bcher-kva.example").reason)
      assert.equal("manual", sup:check("t", "bob@b\xc3\xbccher.example").reason)
      assert.is_true(sup:add("t", "ann@xn--mnchen-3ya.example", "manual"))
      assert.equal("manual", sup:check("t", "ann@m\xc3\xbcnchen.example").reason)
      assert.is_true(sup:remove("t", "bob@XN--BCHER-KVA.example"))
      assert.is_nil(sup:check("t", "bob@b\xc3\xbccher.example"))
      stop(mta, sup)
    end)
  end)

  it("answers with the configured reply", function()
    H.run(function()
      local sup = suppress.setup { path = dir .. "/suppress",
        reply = { 450, "4.7.1", "not now for {address}" } }
      local mta, port = H.start_mta({}, function(m) m:use(sup) end)
      sup:add(nil, "x%1@dest.test", "manual")
      assert.same({ "450 4.7.1 not now for x%1@dest.test" }, rcpts(port, "s@none.test", { "x%1@dest.test" }))
      stop(mta, sup)
    end)
  end)

  it("check = \"queue\" accepts the recipient, then drops it before delivery with delivery_suppressed", function()
    with_sink(nil, function(sink)
      local sup = suppress.setup { path = dir .. "/suppress", check = "queue" }
      local events = {}
      local mta, port = relay_mta(dir, sink.port, sup, function(m)
        m:on("delivery_suppressed", function(env, rcpt, result)
          events[#events + 1] = { tenant = env.tenant, address = rcpt.address, status = result.status,
            reason = result.reason, text = result.text }
        end)
      end)
      sup:add("a.example", "blocked@x.test", "complaint")
      assert.equal(250, (H.send(port, { from = "s@a.example", to = { "blocked@x.test", "ok@x.test" } })))
      assert.equal(250, (H.send(port, { from = "s@b.example", to = { "blocked@x.test" } })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 2 and #events == 1 end, 15))
      local got = {}
      for _, msg in ipairs(sink.messages()) do
        got[#got + 1] = msg.from .. " -> " .. table.concat(msg.rcpts, ",")
      end
      table.sort(got)
      assert.same({ "s@a.example -> ok@x.test", "s@b.example -> blocked@x.test" }, got)
      assert.equal("a.example", events[1].tenant)
      assert.equal("blocked@x.test", events[1].address)
      assert.equal("suppressed", events[1].status)
      assert.equal("complaint", events[1].reason)
      assert.matches("to=<blocked@x.test> suppressed: on the suppression list of tenant \"a.example\" %(complaint",
        H.log("suppressed: "))
      -- no DSN for a suppressed recipient
      assert.equal(0, #H.log("delivery status notification"))
      assert.equal(1, sup:stats().suppressed)
      stop(mta, sup)
    end)
  end)

  it("adds a recipient that bounced with 550 5.1.1 for that tenant only, then refuses it at RCPT", function()
    with_sink(nil, function(sink)
      local sup = suppress.setup { path = dir .. "/suppress", auto = true }
      local mta, port = relay_mta(dir, sink.port, sup)
      assert.equal(250, (H.send(port, { from = "s@a.example", to = { "r550-gone@x.test" } })))
      assert.is_true(H.wait_for(function() return sup:check("a.example", "r550-gone@x.test") ~= nil end, 15))
      local e = sup:check("a.example", "R550-GONE@x.test")
      assert.equal("invalid-recipient", e.reason)
      assert.is_true(math.abs(e.time - os.time()) < 60)
      assert.is_nil(sup:check("b.example", "r550-gone@x.test"))
      assert.is_nil(sup:check(nil, "r550-gone@x.test"))
      assert.truthy(H.log("to=<r550-gone@x.test> added to the suppression list of tenant \"a.example\": invalid-recipient"))
      assert.same({ "550 5.7.1 r550-gone@x.test is on the suppression list" },
        rcpts(port, "s@a.example", { "r550-gone@x.test" }))
      assert.same({ "250 2.1.5 Ok" }, rcpts(port, "s@b.example", { "r550-gone@x.test" }))
      -- a temporary failure is not added
      assert.equal(250, (H.send(port, { from = "s@a.example", to = { "r451-later@x.test" } })))
      assert.is_true(H.wait_for(function() return H.log("to=<r451-later@x.test> deferred") ~= "" end, 15))
      assert.is_nil(sup:check("a.example", "r451-later@x.test"))
      assert.equal(1, sup:count("a.example"))
      stop(mta, sup)
      -- and it was written to the file
      local st = assert(core.open(dir .. "/suppress"))
      assert.equal("invalid-recipient", select(2, st:check("a.example", "r550-gone@x.test")))
      st:close()
    end)
  end)

  it("adds nobody for a refusal of the sender at MAIL FROM, even with 5.1.1", function()
    with_sink(nil, function(sink)
      local sup = suppress.setup { path = dir .. "/suppress", auto = true }
      local mta, port = relay_mta(dir, sink.port, sup)
      assert.equal(250, (H.send(port, { from = "m550-news@a.example", to = { "alice@x.test", "bob@x.test" } })))
      assert.is_true(H.wait_for(function() return H.count(H.log("bounced"), "\n") >= 2 end, 15))
      assert.truthy(H.log("to=<alice@x.test> bounced"):find("MAIL FROM", 1, true))
      assert.is_nil(sup:check("a.example", "alice@x.test"))
      assert.is_nil(sup:check("a.example", "bob@x.test"))
      assert.equal(0, sup:count("a.example"))
      stop(mta, sup)
    end)
  end)

  it("does not add bounces of classes it was not given", function()
    with_sink(nil, function(sink)
      local sup = suppress.setup { path = dir .. "/suppress", auto = { classes = { "bad-domain" } } }
      local mta, port = relay_mta(dir, sink.port, sup)
      assert.equal(250, (H.send(port, { from = "s@a.example", to = { "r550-gone@x.test" } })))
      assert.is_true(H.wait_for(function() return H.log("to=<r550-gone@x.test> bounced") ~= "" end, 15))
      assert.is_nil(sup:check("a.example", "r550-gone@x.test"))
      stop(mta, sup)
    end)
  end)

  it("exports CSV and imports it back, per tenant or all", function()
    H.run(function()
      local sup = suppress.setup { path = dir .. "/suppress", check = "none" }
      assert.is_true(sup:open())
      sup:add("a", "one@x.test", "manual", 1700000001)
      sup:add("a", "\"Last, First\"@x.test", "comma, \"quoted\"", 1700000002)
      sup:add("b", "two@x.test", "invalid-recipient", 1700000003)
      sup:add(nil, "three@x.test", "complaint", 1700000004)
      sup:add("a", "gone@x.test", "manual", 1700000005)
      sup:remove("a", "gone@x.test")
      assert.equal(4, sup:export_csv(dir .. "/all.csv"))
      local text = H.read(dir .. "/all.csv")
      local lines = {}
      for l in text:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.equal("tenant,address,reason,time", lines[1])
      table.sort(lines)
      assert.same({
        ",three@x.test,complaint,1700000004",
        "a,\"\"\"last, first\"\"@x.test\",\"comma, \"\"quoted\"\"\",1700000002",
        "a,one@x.test,manual,1700000001",
        "b,two@x.test,invalid-recipient,1700000003",
        "tenant,address,reason,time",
      }, lines)
      assert.equal(2, sup:export_csv(dir .. "/a.csv", "a"))
      assert.equal(1, sup:export_csv(dir .. "/none.csv", ""))
      -- into a fresh store: the same entries
      local copy = suppress.setup { path = dir .. "/copy", check = "none" }
      local r = assert(copy:import_csv(dir .. "/all.csv"))
      assert.same({ added = 4, existing = 0, skipped = 0, invalid = 0, errors = {} }, r)
      local listed = {}
      assert.equal(4, copy:list(nil, function(address, reason, time, tenant)
        listed[#listed + 1] = table.concat({ tenant, address, reason, time }, "|")
      end))
      table.sort(listed)
      local want = { "|three@x.test|complaint|1700000004", "a|\"last, first\"@x.test|comma, \"quoted\"|1700000002",
        "a|one@x.test|manual|1700000001", "b|two@x.test|invalid-recipient|1700000003" }
      table.sort(want)
      assert.same(want, listed)
      -- again: all there already; one tenant's rows only
      r = assert(copy:import_csv(dir .. "/all.csv", "b"))
      assert.same({ added = 0, existing = 1, skipped = 3, invalid = 0, errors = {} }, r)
      -- a plain list without a header goes to the tenant given
      H.write(dir .. "/plain.csv", "new1@x.test\r\nnew2@x.test,hard bounce\r\n\r\n# a comment\nnew3@x.test,,1600000000\n"
        .. "\"unbalanced@x.test\n,no-address\nbad\ttab@x.test\nnew4@x.test,r,yesterday\n")
      r = assert(copy:import_csv(dir .. "/plain.csv", "c"))
      assert.equal(3, r.added)
      assert.equal(4, r.invalid)
      assert.same({ "line 6: unbalanced quote", "line 7: no address", "line 8: bad address",
        "line 9: time is not Unix seconds: yesterday" }, r.errors)
      assert.same({ reason = "import", time = copy:check("c", "new1@x.test").time }, copy:check("c", "new1@x.test"))
      assert.equal("hard bounce", copy:check("c", "new2@x.test").reason)
      assert.equal(1600000000, copy:check("c", "new3@x.test").time)
      assert.is_nil(copy:check("", "new1@x.test"))
      assert.equal(3, copy:count("c"))
      assert.equal(7, copy:count())
      -- a spreadsheet's export: Excel's sep= line, its own column names, a
      -- tenant with a blank after it; a row without an address is refused
      H.write(dir .. "/sheet.csv", "sep=,\r\nEmail Address,Reason,Tenant\r\nsheet@x.test,complaint, c \r\n"
        .. "not-an-address,junk,c\r\n")
      r = assert(copy:import_csv(dir .. "/sheet.csv", "c"))
      assert.same({ added = 1, existing = 0, skipped = 0, invalid = 1, errors = { "line 4: not an address: not-an-address" } },
        r)
      assert.equal("complaint", copy:check("c", "sheet@x.test").reason)
      assert.equal(4, copy:count("c"))
      -- list() stops when fn returns false
      local n = 0
      assert.equal(1, copy:list(nil, function() n = n + 1 return false end))
      assert.is_true(copy:flush())
      copy:close()
      sup:close()
      assert.same({ nil, "closed" }, { sup:export_csv(dir .. "/closed.csv") })
      local other = suppress.setup { path = dir .. "/other", check = "none" }
      local r2, e2 = other:import_csv(dir .. "/missing.csv")
      assert.is_nil(r2)
      assert.matches("No such file or directory", e2)
      other:close()
    end)
  end)

  it("flush() returns once the changes are synced, and compaction rewrites the log to the live set", function()
    H.run(function()
      local path = dir .. "/suppress"
      local sup = suppress.setup { path = path, check = "none", compact_min = 100 }
      assert.is_true(sup:open())
      local syncs = sup:stats().syncs
      for i = 1, 300 do assert.is_true(sup:add("t", "u" .. i .. "@x.test", "r", 1700000000 + i)) end
      assert.is_true(sup:flush())
      assert.is_true(sup:stats().syncs > syncs)
      assert.equal(0, sup:stats().pending)
      local full = H.read(path):len()
      -- removing 250 of 300 makes the dead lines outnumber the live ones
      for i = 1, 250 do assert.is_true(sup:remove("t", "u" .. i .. "@x.test")) end
      assert.is_true(H.wait_for(function() return sup:stats().compactions == 1 end, 10))
      assert.is_true(sup:flush())
      local st = sup:stats()
      assert.equal(50, st.live)
      assert.equal(50, st.records)
      assert.is_true(H.read(path):len() < full / 4)
      assert.is_nil(H.ls(dir)[2], "no .compact file left")
      assert.truthy(H.log("compacted: 50 entries, 550 records"))
      -- still the same entries, in memory and on disk
      for i = 1, 300 do
        assert.equal(i > 250, sup:check("t", "u" .. i .. "@x.test") ~= nil)
      end
      sup:add("t", "after@x.test", "r")
      assert.is_true(sup:flush())
      sup:close()
      assert.is_true(H.wait_for(function() return not sup:is_open() end, 5))
      local c, rep = assert(core.open(path))
      assert.equal(51, rep.live)
      assert.equal(51, rep.records)
      assert.truthy(c:check("t", "u300@x.test"))
      assert.is_nil(c:check("t", "u1@x.test"))
      c:close()
    end)
  end)

  it("keeps changes made during a compaction, and lists while it runs", function()
    H.run(function()
      local sched = require "moonpost.runtime.sched"
      local path = dir .. "/suppress"
      local sup = suppress.setup { path = path, check = "none", compact_min = 1000 }
      assert.is_true(sup:open())
      -- removing 13334 of 40000 makes the dead lines outnumber the live ones
      for i = 1, 40000 do sup:add("t", "u" .. i .. "@x.test", "r", 1) end
      for i = 1, 26665, 2 do sup:remove("t", "u" .. i .. "@x.test") end
      assert.is_false(sup.compacting)
      sup:remove("t", "u26667@x.test")
      assert.is_true(sup.compacting)
      -- a listing, and changes every millisecond until it is done
      local listed
      sched.spawn(function() listed = sup:list("t", function() end) end)
      -- and each add flushed: once flush() returns, its line is in the file
      -- at path, whichever file that is by then
      local k, flushed, missing = 0, 0, {}
      while sup.compacting do
        k = k + 1
        sup:add("new", "n" .. k .. "@x.test", "r", 2)
        sup:remove("t", "u" .. (2 * k) .. "@x.test")
        sched.spawn(function(n)
          assert(sup:flush())
          if not H.read(path):find("\tn" .. n .. "@x.test\t", 1, true) then missing[#missing + 1] = n end
          flushed = flushed + 1
        end, k)
        sched.sleep(0.001)
      end
      assert.is_true(k > 3, "changes made during the compaction: " .. k)
      assert.is_true(H.wait_for(function() return flushed == k end, 10))
      assert.same({}, missing)
      assert.equal(1, sup:stats().compactions)
      assert.is_true(H.wait_for(function() return listed ~= nil end, 10))
      local live_t = 40000 - 13334 - k
      assert.is_true(listed >= live_t and listed <= live_t + k, listed)
      assert.is_true(sup:flush())
      sup:close()
      assert.is_true(H.wait_for(function() return not sup:is_open() end, 5))
      local c, rep = assert(core.open(path))
      assert.equal(live_t + k, rep.live)
      for i = 1, 40000 do
        local want = not (i <= 26667 and i % 2 == 1) and not (i % 2 == 0 and i <= 2 * k)
        assert.equal(want, c:check("t", "u" .. i .. "@x.test") ~= nil, "u" .. i)
      end
      for i = 1, k do assert.truthy(c:check("new", "n" .. i .. "@x.test")) end
      c:close()
    end)
  end)

  it("keeps its entries across SIGKILL of moonpost run once flush() has returned", function()
    H.run(function()
      local policy = dir .. "/policy.lua"
      H.write(policy, [[
local moonpost = require "moonpost"
local mta = moonpost.new { hostname = "mx.test" }
mta:use(require("moonpost.accept").smtp { listen = moonpost.env.listen })
mta:on("smtp_server_mail_from", function(txn, path) txn.tenant = path.domain:lower() end)
local s = require("moonpost.suppress").setup { path = os.getenv("SUPPRESS_PATH") }
mta:use(s)
-- RCPT TO:<add+user=domain@ctl.test> suppresses user@domain for the sender's
-- tenant and answers once that is on disk
mta:on("smtp_server_rcpt_to", function(txn, rcpt)
  local user, domain = rcpt["local"]:match("^add%+(.-)=(.+)$")
  if rcpt.domain == "ctl.test" and user then
    s:add(txn.tenant, user .. "@" .. domain, "manual")
    local ok, err = s:flush()
    return moonpost.reject(550, "5.7.1", ok and "durable" or ("not durable: " .. tostring(err)))
  end
end)
mta:run()
]])
      local env = { SUPPRESS_PATH = dir .. "/var/suppress" }
      local srv, srv2
      local ok, err = pcall(function()
        srv = H.launch(policy, env)
        -- three sessions add at once: 3 x 40 entries, each acknowledged durable
        local done, acked = 0, {}
        for s = 1, 3 do
          require("moonpost.runtime.sched").spawn(function()
            local list = {}
            for i = 1, 40 do list[i] = "add+s" .. s .. "u" .. i .. "=dest.test@ctl.test" end
            for i, r in ipairs(rcpts(srv.port, "x@a.example", list)) do
              if r == "550 5.7.1 durable" then acked[#acked + 1] = "s" .. s .. "u" .. i .. "@dest.test" end
            end
            done = done + 1
          end)
        end
        assert.is_true(H.wait_for(function() return done == 3 end, 30))
        assert.equal(120, #acked)
        srv.kill()
        srv2 = H.launch(policy, env)
        assert.is_true(H.wait_for(function() return srv2.log():find("var/suppress: 120 entries loaded", 1, true) end,
          10), srv2.log())
        local want = {}
        for i, a in ipairs(acked) do want[i] = "550 5.7.1 " .. a .. " is on the suppression list" end
        assert.same(want, rcpts(srv2.port, "x@a.example", acked))
        assert.same({ "250 2.1.5 Ok", "250 2.1.5 Ok" }, rcpts(srv2.port, "x@b.example", { acked[1], acked[120] }))
        assert.equal(0, srv2.stop())
        assert.matches("closed with 120 entries", srv2.log())
      end)
      if srv then srv.kill() end
      if srv2 then srv2.kill() end
      if not ok then error(err, 0) end
    end, 90)
  end)
end)

describe("moonpost.suppress.setup()", function()
  local function err_of(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok)
    return err
  end

  it("reports a mistake at the caller's line with the field", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local e = err_of(function() suppress.setup { check = "sometimes" } end)
    assert.matches("suppress_spec.lua:" .. line .. ": suppress.setup: field 'check': expected one of", e, 1, true)
    assert.matches("suppress.setup: unknown field 'pth'", err_of(function() suppress.setup { pth = "x" } end), 1, true)
    assert.matches("field 'reply': item 1: expected a 4xx or 5xx code, got 250",
      err_of(function() suppress.setup { reply = { 250 } } end), 1, true)
    assert.matches("field 'reply': item 2: expected an enhanced status code of class 5",
      err_of(function() suppress.setup { reply = { 550, "4.7.1" } } end), 1, true)
    assert.matches("suppress.setup: auto: field 'classes': expected a string or a list of strings",
      err_of(function() suppress.setup { auto = { classes = 5 } } end), 1, true)
    assert.matches("suppress.setup: auto: unknown field 'permanent'",
      err_of(function() suppress.setup { auto = { permanent = true } } end), 1, true)
    assert.matches("suppress.setup: field 'auto': expected true, false or",
      err_of(function() suppress.setup { auto = "yes" } end), 1, true)
  end)

  it("moonpost check refuses an unknown auto class and a list with workers > 1, at the policy's line", function()
    H.run(function()
      for _, case in ipairs({
        { "bad_suppress_class.lua", 3, "suppress.setup: auto: field 'classes': item 2: unknown class "
          .. "'invalid-recipents' (known: invalid-recipient, " },
        { "bad_suppress_workers.lua", 4, "suppress.setup: a suppression list is kept by one process, "
          .. "and this policy runs 2 workers" },
      }) do
        local path = "spec/fixtures/policies/" .. case[1]
        for _, cmd in ipairs({ "check", "run" }) do
          local code, out, err = H.exec(H.root .. "/scripts/moonpost", { cmd, path }, { cwd = H.root, timeout = 30 })
          assert.equal(1, code, cmd .. " " .. path)
          assert.equal("", out)
          local want = "moonpost: " .. path .. ":" .. case[2] .. ": " .. case[3]
          assert.equal(want, err:sub(1, #want), cmd .. ": " .. err)
          assert.falsy(err:find("stack traceback", 1, true))
        end
      end
    end)
  end)

  it("fails mta:start() with the block's name when the file cannot be opened", function()
    H.run(function()
      local dir = H.tmpdir("moonpost-suppress")
      H.write(dir .. "/file", "")
      local moonpost = require "moonpost"
      local mta = moonpost.new { hostname = "mx.test" }
      mta:use(suppress.setup { path = dir .. "/file/suppress" })
      local ok, err = mta:start()
      assert.is_nil(ok)
      assert.matches("^suppress: suppress: ", err)
      H.rm_rf(dir)
    end)
  end)
end)
