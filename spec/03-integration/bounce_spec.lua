-- Bounce classes end to end: a real peer (spec/tools/sink.py) refuses
-- recipients, the queue classifies the results before delivery_bounced /
-- delivery_deferred, the log line and the DSN say the class, and a policy's
-- moonpost.bounce rules change it. `moonpost check` reports a bad rule at
-- the policy's line.
local H = require "helpers"

-- An in-process MTA relaying everything to `port`; setup(mta) adds the
-- policy's blocks and hooks.
local function relay_mta(dir, port, setup)
  return H.start_mta({}, function(m)
    m:use(require("moonpost.route").smtp({ relay = "127.0.0.1:" .. port, idle_timeout = "2s",
      timeouts = { connect = 2, greeting = 2, ehlo = 2, mail = 2, rcpt = 2, data = 2, block = 2, done = 2 } }))
    if setup then setup(m) end
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "1h" } })
end

-- The DSN's text part and its per-recipient report fields, read by Python's
-- email package.
local parse_dsn = H.parse_dsn

local with_sink = H.with_sink

-- the DSN the sink received for origin@sender.test
local function dsn_of(sink)
  for _, m in ipairs(sink.messages()) do
    if m.rcpts[1] == "origin@sender.test" then return parse_dsn(m.data) end
  end
end

describe("bounce classes on deliveries", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-bounce") end)
  after_each(function() H.rm_rf(dir) end)

  it("delivery_bounced and delivery_deferred carry result.class and result.permanent; the DSN says the class",
    function()
      with_sink(function(sink)
        local bounced, deferred = {}, {}
        local mta, port = relay_mta(dir, sink.port, function(m)
          m:on("delivery_bounced", function(_, rcpt, res)
            bounced[rcpt.address] = { class = res.class, permanent = res.permanent }
          end)
          m:on("delivery_deferred", function(_, rcpt, res)
            deferred[rcpt.address] = { class = res.class, permanent = res.permanent }
          end)
        end)
        assert.equal(250, (H.send(port, { from = "origin@sender.test",
          to = { "r550-gone@x.test", "r451-later@x.test" }, body = "Subject: classes\r\n\r\nbody\r\n" })))
        assert.is_true(H.wait_for(function() return dsn_of(sink) ~= nil and deferred["r451-later@x.test"] end, 20))
        -- the sink's "550 5.1.1 no such user here" and "451 4.2.0 try again later"
        assert.same({ class = "invalid-recipient", permanent = true }, bounced["r550-gone@x.test"])
        assert.same({ class = "other", permanent = false }, deferred["r451-later@x.test"])
        assert.truthy(H.log("to=<r550-gone@x.test> bounced: "):find(
          "RCPT TO: 550 5.1.1 no such user here (invalid-recipient, hard)", 1, true), H.log("r550-gone"))
        assert.truthy(H.log("to=<r451-later@x.test> deferred: "):find("(other, soft)", 1, true))
        local d = dsn_of(sink)
        assert.truthy(d.text:find("<r550-gone@x.test>: The recipient address does not exist (invalid-recipient)\r\n"
          .. "    550 5.1.1 no such user here", 1, true), d.text)
        assert.equal(1, #d.recipients)
        assert.equal("rfc822; r550-gone@x.test", d.recipients[1]["Final-Recipient"])
        assert.equal("invalid-recipient", d.recipients[1]["X-Moonpost-Bounce-Class"])
        assert.equal("5.1.1", d.recipients[1]["Status"])
        H.stop_mta(mta)
      end)
    end)

  it("a moonpost.bounce block's rules decide the class, hard or soft, and the DSN's text", function()
    with_sink(function(sink)
      local bounced = {}
      local mta, port = relay_mta(dir, sink.port, function(m)
        m:use(require("moonpost.bounce").setup { rules = {
          { pattern = "no such user here", class = "inactive-mailbox", permanent = false },
          { pattern = { regex = [[^554 5\.6\.0 ]] }, class = "spam-related" },
        } })
        m:on("delivery_bounced", function(_, rcpt, res)
          bounced[rcpt.address] = { class = res.class, permanent = res.permanent }
        end)
      end)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "r550-gone@x.test" } })))
      assert.equal(250, (H.send(port, { from = "other@sender.test", to = { "d554-x@x.test" } })))
      assert.is_true(H.wait_for(function() return dsn_of(sink) ~= nil and bounced["d554-x@x.test"] end, 20))
      assert.same({ class = "inactive-mailbox", permanent = false }, bounced["r550-gone@x.test"])
      assert.same({ class = "spam-related", permanent = true }, bounced["d554-x@x.test"])
      local d = dsn_of(sink)
      assert.truthy(d.text:find("<r550-gone@x.test>: The recipient's mailbox is disabled or no longer in use "
        .. "(inactive-mailbox)", 1, true), d.text)
      assert.equal("inactive-mailbox", d.recipients[1]["X-Moonpost-Bounce-Class"])
      H.stop_mta(mta)
    end)
  end)

  it("moonpost check reports an unknown class in a rule at the policy's file and line", function()
    H.run(function()
      local code, out, err = H.exec(H.root .. "/scripts/moonpost", { "check", "spec/fixtures/policies/bad_bounce.lua" },
        { cwd = H.root, timeout = 30 })
      assert.equal(1, code)
      assert.equal("", out)
      local want = "moonpost: spec/fixtures/policies/bad_bounce.lua:3: bounce.setup: field 'rules[2].class': "
        .. "unknown class 'hard-bounce' (known: invalid-recipient, "
      assert.equal(want, err:sub(1, #want))
      assert.falsy(err:find("stack traceback", 1, true))
    end)
  end)
end)
