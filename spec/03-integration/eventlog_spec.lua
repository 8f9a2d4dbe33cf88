-- moonpost.eventlog on a real loop: one JSON line per event (read back with
-- lua-cjson and with Python's json) for mail delivered, deferred, bounced,
-- expired and refused through the programmable sink; the file reopened on
-- SIGUSR1 by a launched `moonpost run`; the webhook sink posting every
-- record to a loopback receiver that is down for part of the run, and the
-- records still queued when Moonpost is killed arriving after its restart.
local H = require "helpers"
local cjson = require "cjson"
local uv = require "luv"

local eventlog = require "moonpost.eventlog"

local TIME = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"

-- fn(mnt) on a tmpfs of `size` mounted at <dir>/mnt (root needed), then
-- cleanup(), then the tmpfs is unmounted; fn's error is raised after that
local function on_tmpfs(dir, size, fn, cleanup)
  local mnt = dir .. "/mnt"
  assert(uv.fs_mkdir(mnt, 448))
  local code, _, merr = H.exec("mount", { "-t", "tmpfs", "-o", "size=" .. size, "tmpfs", mnt }, { timeout = 10 })
  if code ~= 0 then
    pending("cannot mount a tmpfs (needs root): " .. tostring(merr))
    return
  end
  local ok, err = pcall(fn, mnt)
  if cleanup then cleanup() end
  H.exec("umount", { "-l", mnt }, { timeout = 10 })
  if not ok then error(err, 0) end
end

local function lines_of(path)
  local out = {}
  local f = io.open(path, "rb")
  if not f then return out end
  for line in f:lines() do out[#out + 1] = line end
  f:close()
  return out
end

-- every line decodes to an object; the records
local function records(path)
  local list = {}
  for i, line in ipairs(lines_of(path)) do
    local ok, rec = pcall(cjson.decode, line)
    assert(ok and type(rec) == "table", "line " .. i .. " of " .. path .. " is not a JSON object: " .. line)
    list[#list + 1] = rec
  end
  return list
end

local function of_type(list, kind, pred)
  local out = {}
  for _, r in ipairs(list) do
    if r.type == kind and (not pred or pred(r)) then out[#out + 1] = r end
  end
  return out
end

-- Python's json reads every line as an object; returns the number of lines
local PY_CHECK = [[
import json, sys
n = 0
with open(sys.argv[1], encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
        assert line.endswith("\n"), "line %d has no newline" % i
        obj = json.loads(line)
        assert isinstance(obj, dict), "line %d is not an object" % i
        assert isinstance(obj["type"], str) and isinstance(obj["time"], str), "line %d" % i
        n += 1
print(n)
]]

local function python_count(path)
  local code, out, err = H.exec(H.python, { "-c", PY_CHECK, path }, { timeout = 30 })
  assert(code == 0, "python json: " .. tostring(err))
  return tonumber(out)
end

-- A key for a record: the same record read from the file and from the webhook
local function key(r)
  local reply = r.reply or {}
  return table.concat({ r.type, r.time, tostring(r.id), tostring(r.recipient), tostring(r.attempt),
    tostring(r.stage), tostring(r.session), tostring(r.action), tostring(r.dsn_id), tostring(reply.code) }, "|")
end

local function queued_id(text)
  return text and text:match("queued as (%x+)")
end

-- One message by hand over STARTTLS: the final reply
local function send_tls(port, from, to)
  local p = assert(H.connect(port))
  p:expect(220)
  p:cmd("EHLO tls-client.test")
  p:expect(250)
  p:cmd("STARTTLS")
  p:expect(220)
  assert(p:starttls())
  p:cmd("EHLO tls-client.test")
  p:expect(250)
  p:cmd("MAIL FROM:<" .. from .. ">")
  p:expect(250)
  p:cmd("RCPT TO:<" .. to .. ">")
  p:expect(250)
  p:cmd("DATA")
  p:expect(354)
  p:send("Subject: tls\r\n\r\nbody\r\n.\r\n")
  local c, _, t = p:reply()
  p:cmd("QUIT")
  p:reply()
  p:close()
  return c, t
end

-- A session that is refused at MAIL, at RCPT and at the end of the data
local function send_refused(port)
  local p = assert(H.connect(port))
  p:expect(220)
  p:cmd("EHLO refused.test")
  p:expect(250)
  p:cmd("MAIL FROM:<spammer@bad.test>")
  p:expect(550, "5.7.1", "sender refused")
  p:cmd("MAIL FROM:<s4@client.test>")
  p:expect(250)
  p:cmd("RCPT TO:<blocked@x.test>")
  p:expect(550, "5.7.1", "blocked by policy")
  p:cmd("RCPT TO:<fine@x.test>")
  p:expect(250)
  p:cmd("DATA")
  p:expect(354)
  p:send("Subject: reject-me\r\n\r\nbody\r\n.\r\n")
  p:expect(554, "5.7.1", "content refused")
  p:cmd("QUIT")
  p:reply()
  p:close()
end

-- The loopback webhook receiver (spec/tools/webhook.py) on `port` (0: any)
-- (retry_after: seconds, or "date+N" for an HTTP-date N seconds ahead)
local function receiver(out, port, fail, delay, fail_status, retry_after)
  local argv = { H.root .. "/spec/tools/webhook.py", "--out", out, "--port", tostring(port or 0) }
  if fail then argv[#argv + 1] = "--fail"; argv[#argv + 1] = tostring(fail) end
  local ahead = type(retry_after) == "string" and retry_after:match("^date%+(%d+)$")
  if ahead then
    argv[#argv + 1] = "--retry-after-date"; argv[#argv + 1] = ahead
  elseif retry_after then
    argv[#argv + 1] = "--retry-after"; argv[#argv + 1] = tostring(retry_after)
  end
  if fail_status then argv[#argv + 1] = "--fail-status"; argv[#argv + 1] = tostring(fail_status) end
  if delay then argv[#argv + 1] = "--delay"; argv[#argv + 1] = tostring(delay) end
  local stdin, stdout = uv.new_pipe(false), uv.new_pipe(false)
  local buf, exited = {}, false
  local handle, pid
  handle, pid = uv.spawn(H.python, { args = argv, stdio = { stdin, stdout, 2 } }, function()
    exited = true
    handle:close()
  end)
  assert(handle, "cannot start the receiver: " .. tostring(pid))
  stdout:read_start(function(_, chunk) if chunk then buf[#buf + 1] = chunk else stdout:close() end end)
  local got
  H.wait_for(function()
    got = tonumber(table.concat(buf):match("port (%d+)"))
    return got ~= nil or exited
  end, 20)
  assert(got, "the receiver did not start: " .. table.concat(buf))
  local r = { port = got }
  function r.records() return records(out) end
  function r.requests() return records(out .. ".requests") end
  function r.failed() return records(out .. ".failed") end
  function r.stop()
    if not stdin:is_closing() then stdin:close() end
    H.wait_for(function() return exited end, 10)
    if not exited then uv.kill(pid, "sigkill") end
    H.wait_for(function() return exited end, 5)
  end
  return r
end

-- fn(elog, rcv): an event log whose webhook posts to the receiver that
-- start_receiver() returns, with these webhook options (url added); both
-- stopped after fn, whose error is raised after that
local function with_webhook(start_receiver, wopts, fn)
  H.run(function()
    local rcv = start_receiver()
    local o = { url = "http://127.0.0.1:" .. rcv.port .. "/" }
    for k, v in pairs(wopts) do o[k] = v end
    local elog = eventlog.setup { webhook = o }
    local ok, err = pcall(function()
      assert.is_true(elog:start())
      fn(elog, rcv)
    end)
    elog:stop()
    rcv.stop()
    if not ok then error(err, 0) end
  end)
end

describe("moonpost.eventlog", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-eventlog") end)
  after_each(function() H.rm_rf(dir) end)

  it("setup() refuses bad options at the policy's line", function()
    assert.has_error(function() eventlog.setup {} end,
      "eventlog.setup: give at least one sink: file, stdout or webhook")
    local ok, err = pcall(eventlog.setup, { webhook = { url = "https://example.com/x" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("field 'url': only http:// is supported", 1, true), err)
    ok, err = pcall(eventlog.setup, { file = "x", types = { "Delivery", "Nope" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("unknown record type \"Nope\"", 1, true), err)
    ok, err = pcall(eventlog.setup, { file = "x", webhook = { url = "http://127.0.0.1:1/", headers = { ["X-A"] = "a\r\nb" } } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("bad value for X-A", 1, true), err)
  end)

  it("setup() refuses a webhook URL or header that would break the request: a space, a control character "
    .. "or a non-ASCII octet in the URL, a header field the client writes itself", function()
    for _, url in ipairs({ "http://127.0.0.1:9000/events batch", "http://127.0.0.1:9000/e\r\nX-Injected: yes",
      "http://127.0.0.1:9000/e?a=\t1", "http://127.0.0.1:9000/\195\169v\195\169nements" }) do
      local ok, err = pcall(eventlog.setup, { webhook = { url = url } })
      assert.is_false(ok, url)
      assert.truthy(tostring(err):find("field 'url'", 1, true), err)
    end
    for _, name in ipairs({ "Content-Length", "content-length", "Host", "Transfer-Encoding", "Content-Type",
      "X-Moonpost-Events" }) do
      local ok, err = pcall(eventlog.setup, { webhook = { url = "http://127.0.0.1:9000/", headers = { [name] = "1" } } })
      assert.is_false(ok, name)
      assert.truthy(tostring(err):find("field 'headers'", 1, true), err)
    end
    -- percent-encoded, and headers of its own: fine
    assert.truthy(eventlog.setup({ webhook = { url = "http://127.0.0.1:9000/%C3%A9v?a=1%202",
      headers = { Authorization = "Bearer x", ["X-Tenant"] = "shop" } } }))
  end)

  it("encode() writes type and time first, and valid UTF-8 whatever the input", function()
    local line = eventlog.encode({ recipient = "a/b@x.test", type = "Bounce", time = "T", zeta = 1,
      reply = { text = "bad \255\254 bytes \195" } })
    assert.equal('{"type":"Bounce","time":"T","recipient":"a/b@x.test","reply":{"text":"bad \239\191\189'
      .. '\239\191\189 bytes \239\191\189"},"zeta":1}', line)
    assert.equal("a/b@x.test", cjson.decode(line).recipient)
    assert.equal('{"type":"X","list":[1,"two",[3.5]],"nested":{"a":false,"b":{"c":"q\\"\\\\\\n\\u0001"}}}',
      eventlog.encode({ type = "X", nested = { b = { c = 'q"\\\n\1' }, a = false }, list = { 1, "two", { 3.5 } } }))
    assert.has_error(function() eventlog.encode({ type = "X", f = print }) end, "cannot encode a function in JSON")
    assert.has_error(function() eventlog.encode({ type = "X", n = 0 / 0 }) end, "cannot encode NaN or infinity in JSON")
    local cyc = {}
    cyc.self = cyc
    assert.has_error(function() eventlog.encode({ type = "X", c = cyc }) end, "a value nested more than 16 deep")
  end)

  it("writes one valid JSON line per event: receptions, deliveries, deferrals, bounces, expirations, "
    .. "rejections, DSNs, suppressions and admin actions", function()
    local d = H.certs()
    H.with_sink({ "--tls", d .. "/self.pem", d .. "/self.key" }, function(sink)
      local path = dir .. "/log/events.jsonl"
      local elog = eventlog.setup { file = path }
      local sup = require("moonpost.suppress").setup { path = dir .. "/suppress", check = "queue" }
      -- what the hooks saw, to count against the records
      local seen = { delivered = 0, deferred = 0, bounced = 0, expired = 0, suppressed = 0, queued = 0,
        rejected = 0, dsn = 0 }
      local mta, port = H.start_mta({ tls = { cert = d .. "/mx.pem", key = d .. "/mx.key" } }, function(m, moonpost)
        m:use(elog)
        m:use(sup)
        m:on("smtp_server_mail_from", function(_, path_)
          if path_.address == "spammer@bad.test" then return moonpost.reject(550, "5.7.1", "sender refused") end
        end)
        m:on("smtp_server_rcpt_to", function(_, rcpt)
          if rcpt.address == "blocked@x.test" then return moonpost.reject(550, "5.7.1", "blocked by policy") end
        end)
        m:on("smtp_server_message_received", function(_, msg)
          if msg:tostring():find("Subject: reject-me", 1, true) then
            return moonpost.reject(554, "5.7.1", "content refused")
          end
        end)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port, idle_timeout = "1s" })
        m:on("delivery_delivered", function() seen.delivered = seen.delivered + 1 end)
        m:on("delivery_deferred", function() seen.deferred = seen.deferred + 1 end)
        m:on("delivery_bounced", function(_, _, res)
          if res.expired then seen.expired = seen.expired + 1 else seen.bounced = seen.bounced + 1 end
        end)
        m:on("delivery_suppressed", function() seen.suppressed = seen.suppressed + 1 end)
        m:on("smtp_server_message_queued", function() seen.queued = seen.queued + 1 end)
        m:on("smtp_server_rejected", function() seen.rejected = seen.rejected + 1 end)
        m:on("delivery_dsn", function() seen.dsn = seen.dsn + 1 end)
      end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "3s" } })
      assert.is_true(sup:add("", "supp@x.test", "complaint"))
      local ids = {}
      local c, _, t = H.send(port, { from = "s1@client.test", to = { "ok1@x.test", "ok2@x.test" } })
      assert.equal(250, c)
      ids.ok = queued_id(t)
      c, _, t = H.send(port, { from = "s2@client.test", to = "r550-a@x.test" })
      assert.equal(250, c)
      ids.bounce = queued_id(t)
      c, _, t = H.send(port, { from = "s3@client.test", to = "r451-b@x.test" })
      assert.equal(250, c)
      ids.deferred = queued_id(t)
      c, _, t = H.send(port, { from = "s5@client.test", to = "supp@x.test" })
      assert.equal(250, c)
      ids.supp = queued_id(t)
      c, t = send_tls(port, "s6@client.test", "tls@x.test")
      assert.equal(250, c)
      ids.tls = queued_id(t)
      send_refused(port)
      mta:event_log({ type = "AdminAction", action = "suspend", target = { domain = "x.test" }, by = "spec" })
      assert.has_error(function() mta:event_log({ action = "x" }) end,
        "event_log(record): record must be a table with a string field 'type'")
      -- the DSNs of the bounce and of the expiry are delivered too; the
      -- deferred message expires after 3 s
      assert.is_true(H.wait_for(function()
        return seen.expired == 1 and seen.dsn == 2 and seen.delivered == 5
      end, 20), "delivered " .. seen.delivered .. ", dsn " .. seen.dsn .. ", expired " .. seen.expired)
      H.stop_mta(mta)
      assert.is_true(H.wait_for(function() return not sup:is_open() end, 10))

      local recs = records(path)
      assert.equal(#recs, python_count(path))
      for _, r in ipairs(recs) do
        assert.truthy(tostring(r.time):match(TIME), "time " .. tostring(r.time))
      end
      -- one record per event
      assert.equal(seen.queued, #of_type(recs, "Reception"))
      assert.equal(seen.delivered, #of_type(recs, "Delivery"))
      assert.equal(seen.deferred, #of_type(recs, "TransientFailure"))
      assert.equal(seen.bounced, #of_type(recs, "Bounce"))
      assert.equal(seen.expired, #of_type(recs, "Expiration"))
      assert.equal(seen.rejected, #of_type(recs, "Rejection"))
      assert.equal(seen.dsn, #of_type(recs, "DSN"))
      assert.equal(1, #of_type(recs, "AdminAction"))
      assert.equal(3, seen.rejected)
      assert.is_true(seen.deferred >= 1)

      -- Reception
      local rec = of_type(recs, "Reception", function(r) return r.id == ids.ok end)[1]
      assert.same({ "ok1@x.test", "ok2@x.test" }, rec.recipients)
      assert.equal("s1@client.test", rec.sender)
      assert.equal("127.0.0.1", rec.ip)
      assert.equal("client.test", rec.host)
      assert.truthy(rec.listener:match("^127%.0%.0%.1:%d+$"))
      assert.is_string(rec.session)
      assert.is_true(rec.size > 0)
      assert.is_nil(rec.tls)
      local trec = of_type(recs, "Reception", function(r) return r.id == ids.tls end)[1]
      assert.equal("TLSv1.3", trec.tls.version)
      assert.is_string(trec.tls.cipher)
      -- no Reception for the message refused at the end of its data
      assert.equal(5, #of_type(recs, "Reception")) -- a DSN has its DSN record instead
      -- Delivery: two recipients of one message, over TLS to the sink
      local dl = of_type(recs, "Delivery", function(r) return r.id == ids.ok end)
      assert.equal(2, #dl)
      table.sort(dl, function(a, b) return a.recipient < b.recipient end)
      assert.equal("ok1@x.test", dl[1].recipient)
      for _, r in ipairs(dl) do
        assert.equal(250, r.reply.code)
        assert.equal("[127.0.0.1]:" .. sink.port, r.host)
        assert.equal("127.0.0.1", r.ip)
        assert.equal(1, r.attempt)
        assert.equal("number", type(r.latency))
        assert.is_true(r.latency >= 0 and r.latency < 10)
        assert.equal("TLSv1.3", r.tls.version)
        assert.is_string(r.tls.cipher)
        assert.equal("s1@client.test", r.sender)
        assert.equal("end of data", r.stage)
        assert.is_string(r.helo)
        assert.equal("[127.0.0.1]:" .. sink.port, r.site)
      end
      -- Bounce: the sink's 550 5.1.1 at RCPT
      local b = of_type(recs, "Bounce")[1]
      assert.equal(ids.bounce, b.id)
      assert.same({ code = 550, enhanced = "5.1.1" }, { code = b.reply.code, enhanced = b.reply.enhanced })
      assert.equal("invalid-recipient", b.class)
      assert.is_true(b.permanent)
      assert.equal("RCPT TO", b.stage)
      assert.equal("r550-a@x.test", b.recipient)
      -- TransientFailure: the attempts count up
      local tf = of_type(recs, "TransientFailure")
      for i, r in ipairs(tf) do
        assert.equal(ids.deferred, r.id)
        assert.equal(i, r.attempt)
        assert.equal(451, r.reply.code)
        assert.is_false(r.permanent)
        assert.is_string(r.class)
      end
      -- Expiration
      local ex = of_type(recs, "Expiration")[1]
      assert.equal(ids.deferred, ex.id)
      assert.equal("4.4.7", ex.reply.enhanced)
      assert.equal("message-expired", ex.class)
      assert.is_true(ex.permanent)
      assert.equal(#tf + 1, ex.attempt)
      assert.is_true(ex.latency >= 3)
      -- DSNs to the senders, each delivered as a message of its own (sender "")
      local dsns = of_type(recs, "DSN")
      table.sort(dsns, function(a, c2) return a.id < c2.id end)
      assert.same({ ids.bounce, ids.deferred }, { dsns[1].id, dsns[2].id })
      assert.same({ "s2@client.test", "s3@client.test" }, { dsns[1].recipient, dsns[2].recipient })
      assert.same({ "r550-a@x.test" }, dsns[1].reported)
      assert.equal("failed", dsns[1].action)
      for _, dsn in ipairs(dsns) do
        local dd = of_type(recs, "Delivery", function(r) return r.id == dsn.dsn_id end)
        assert.equal(1, #dd)
        assert.equal("", dd[1].sender)
        assert.equal(dsn.recipient, dd[1].recipient)
      end
      -- Rejection at MAIL, at RCPT and at the end of the data
      local rj = of_type(recs, "Rejection")
      assert.same({ "MAIL FROM", "RCPT TO", "end of data" }, { rj[1].stage, rj[2].stage, rj[3].stage })
      assert.equal("spammer@bad.test", rj[1].sender)
      assert.same({ code = 550, enhanced = "5.7.1", text = "sender refused" }, rj[1].reply)
      assert.is_nil(rj[1].id)
      assert.equal("blocked@x.test", rj[2].recipient)
      assert.equal("s4@client.test", rj[2].sender)
      assert.is_string(rj[2].id)
      assert.same({ code = 554, enhanced = "5.7.1", text = "content refused" }, rj[3].reply)
      assert.equal(rj[2].id, rj[3].id)
      for _, r in ipairs(rj) do
        assert.equal("127.0.0.1", r.ip)
        assert.equal("refused.test", r.host)
        assert.equal(rj[1].session, r.session)
      end
      -- Suppression: the add, then the recipient it kept from delivery
      local sp = of_type(recs, "Suppression")
      assert.equal(2, #sp)
      assert.same({ "added", "supp@x.test", "complaint" }, { sp[1].action, sp[1].recipient, sp[1].reason })
      assert.same({ "suppressed", "supp@x.test", ids.supp, "complaint" },
        { sp[2].action, sp[2].recipient, sp[2].id, sp[2].reason })
      -- AdminAction, as given
      local aa = of_type(recs, "AdminAction")[1]
      assert.same({ "suspend", "spec", "x.test" }, { aa.action, aa.by, aa.target.domain })
      -- in order of time
      for i = 2, #recs do assert.is_true(recs[i].time >= recs[i - 1].time, "line " .. i .. " is out of order") end
      assert.truthy(H.log("eventlog: stopped: Reception 5,"))
    end, 60)
  end)

  it("types = {...} keeps only those records", function()
    H.run(function()
      local path = dir .. "/only.jsonl"
      local elog = eventlog.setup { file = path, types = { "Rejection" } }
      local mta, port = H.start_mta({}, function(m, moonpost)
        m:use(elog)
        m:on("smtp_server_rcpt_to", function() return moonpost.tempfail(451, "4.7.1", "later") end)
      end)
      assert.equal(451, (H.send(port, { to = "a@x.test" })))
      H.stop_mta(mta)
      local recs = records(path)
      assert.is_true(#recs >= 1)
      for _, r in ipairs(recs) do assert.equal("Rejection", r.type) end
      assert.same({ code = 451, enhanced = "4.7.1", text = "later" }, recs[1].reply)
    end)
  end)

  it("webhook: a 429 with Retry-After is retried no sooner than it asks", function()
    with_webhook(function() return receiver(dir .. "/got.jsonl", 0, 1, nil, 429, 2) end,
      { dir = dir .. "/wh", batch = 1, interval = 0.05, retry_min = 0.05, retry_max = 5 }, function(elog, rcv)
      elog:log({ type = "AdminAction", action = "one" })
      assert.is_true(H.wait_for(function() return #rcv.records() == 1 end, 10))
      local failed, got = rcv.failed(), rcv.requests()
      assert.equal(1, #failed)
      assert.equal(429, failed[1].status)
      -- the endpoint asked for 2 s; retry_min alone would have come back after 0.05 s
      local waited = got[1].t - failed[1].t
      assert.is_true(waited >= 1.9, string.format("retried %.2f s after the 429", waited))
    end)
  end)

  it("webhook: a 503 with Retry-After as an HTTP-date is retried no sooner than that date", function()
    with_webhook(function() return receiver(dir .. "/got.jsonl", 0, 1, nil, 503, "date+3") end,
      { dir = dir .. "/wh", batch = 1, interval = 0.05, retry_min = 0.05, retry_max = 10 }, function(elog, rcv)
      elog:log({ type = "AdminAction", action = "one" })
      assert.is_true(H.wait_for(function() return #rcv.records() == 1 end, 15))
      local failed, got = rcv.failed(), rcv.requests()
      assert.equal(1, #failed)
      assert.equal(503, failed[1].status)
      -- a date 3 s ahead, to the second: at least 2 s; retry_min alone came back after 0.05 s
      local waited = got[1].t - failed[1].t
      assert.is_true(waited >= 1.9, string.format("retried %.2f s after the 503", waited))
    end)
  end)

  it("webhook: drop_after drops a batch the endpoint refuses for good (4xx), and goes on", function()
    with_webhook(function() return receiver(dir .. "/got.jsonl", 0, 2, nil, 400) end,
      { dir = dir .. "/wh", batch = 2, interval = 0.05, retry_min = 0.05, retry_max = 0.05, drop_after = 2 }, function(elog, rcv)
      elog:log({ type = "AdminAction", action = "one" })
      elog:log({ type = "AdminAction", action = "two" })
      -- refused twice with 400: dropped; the next batch goes through
      assert.is_true(H.wait_for(function() return (elog.webhook.stats.dropped_batches or 0) == 1 end, 10))
      elog:log({ type = "AdminAction", action = "three" })
      elog:log({ type = "AdminAction", action = "four" })
      assert.is_true(H.wait_for(function() return #rcv.records() == 2 end, 10))
      local got = {}
      for i, r in ipairs(rcv.records()) do got[i] = r.action end
      assert.same({ "three", "four" }, got)
      assert.equal(2, elog.webhook.stats.dropped_events)
      assert.matches("refused a batch of 2 records 2 times %(HTTP 400", H.log("dropped"))
    end)
  end)

  -- The sender's read waits for the disk (the thread pool): records logged
  -- meanwhile, after it had looked, must not wait for a later record to
  -- wake the sender (a CI run lost "three" and "four" above this way).
  it("webhook: records queued while the sender reads are sent without a later record", function()
    with_webhook(function() return receiver(dir .. "/got.jsonl") end,
      { dir = dir .. "/wh", batch = 2, interval = 0.05 }, function(elog, rcv)
      local ob = elog.webhook.outbox
      local real, forced = ob.read, false
      -- the interleaving forced: the read finds nothing, then two records
      -- are logged before it returns
      ob.read = function(o, max)
        local b, err = real(o, max)
        if not forced and b and b.n == 0 then
          forced = true
          elog:log({ type = "AdminAction", action = "during" })
          elog:log({ type = "AdminAction", action = "the read" })
        end
        return b, err
      end
      -- one record, sent; the read after it finds nothing, and is forced
      elog:log({ type = "AdminAction", action = "first" })
      assert.is_true(H.wait_for(function() return forced end, 5))
      assert.is_true(H.wait_for(function() return #rcv.records() == 3 end, 5), "the records were left waiting")
      local got = {}
      for i, r in ipairs(rcv.records()) do got[i] = r.action end
      assert.same({ "first", "during", "the read" }, got)
      ob.read = real
    end)
  end)

  it("webhook: max_size bounds the records waiting, not those sent: a queue below one segment keeps "
    .. "taking records once the endpoint has them", function()
    with_webhook(function() return receiver(dir .. "/got.jsonl") end,
      { dir = dir .. "/wh", batch = 10, interval = 0.05, max_size = 4096 }, function(elog, rcv)
    -- 4 KiB of queue, in the default 16 MiB segment: 10 records of ~270 octets wait at most
      local pad = string.rep("x", 200)
      local n = 0
      for round = 1, 5 do
        for _ = 1, 10 do
          n = n + 1
          elog:log({ type = "AdminAction", action = "a" .. n, pad = pad })
        end
        -- every record arrived, and the queue has the endpoint's answer
        assert.is_true(H.wait_for(function() return #rcv.records() == n and elog:stats().webhook.backlog == 0 end,
          10),
          string.format("round %d: %d of %d records arrived, %d refused by the queue", round, #rcv.records(), n,
            elog:stats().webhook.refused))
      end
      assert.equal(0, elog:stats().webhook.refused)
    end)
  end)

  it("webhook: a queue that filled its disk while the endpoint was down frees it once the endpoint "
    .. "has the records, and queues new ones again", function()
    H.run(function()
      local elog, rcv
      on_tmpfs(dir, "256k", function(mnt)
        local wport = H.free_port()
        elog = eventlog.setup { webhook = { url = "http://127.0.0.1:" .. wport .. "/", dir = mnt .. "/wh",
          batch = 50, interval = 0.05, retry_min = 0.05, retry_max = 0.2, segment_size = 16384 } }
        assert.is_true(elog:start())
        local pad = string.rep("x", 400)
        -- the endpoint is down: the queue fills the disk, then records are refused
        local n = 0
        while elog:stats().webhook.refused == 0 and n < 5000 do
          n = n + 1
          elog:log({ type = "AdminAction", action = "before" .. n, pad = pad })
        end
        assert.is_true(elog:stats().webhook.refused > 0, "the disk did not fill")
        local queued = n - elog:stats().webhook.refused
        -- it comes up and takes everything that was queued
        rcv = receiver(dir .. "/got.jsonl", wport)
        assert.is_true(H.wait_for(function() return elog:stats().webhook.backlog == 0 end, 30))
        assert.equal(queued, #rcv.records())
        -- new records are queued and sent again
        for i = 1, 10 do elog:log({ type = "AdminAction", action = "after" .. i, pad = pad }) end
        assert.is_true(H.wait_for(function() return #rcv.records() == queued + 10 end, 10),
          string.format("%d of the 10 new records arrived; %d refused by the queue", #rcv.records() - queued,
            elog:stats().webhook.refused - (n - queued)))
        assert.equal("after10", rcv.records()[queued + 10].action)
      end, function()
        if elog then elog:stop() end
        if rcv then rcv.stop() end
      end)
    end, 60)
  end)

  it("handover() (policy reload): the new block shares the old one's file and webhook queue, in one order; "
    .. "the last stop closes them", function()
    H.run(function()
      local path = dir .. "/ev.jsonl"
      local wh = { url = "http://127.0.0.1:" .. H.free_port() .. "/", dir = dir .. "/wh", retry_min = "30s",
        retry_max = "30s" }
      local old = eventlog.setup { file = path, webhook = wh }
      assert.is_true(old:start())
      old:log({ type = "AdminAction", action = "one" })
      local new = eventlog.setup { file = path, webhook = wh, types = { "AdminAction" } }
      assert.is_true(new:handover(old))
      assert.is_true(new:start())
      assert.equal(old.webhook, new.webhook)
      assert.equal(old.writers[1], new.writers[1])
      old:log({ type = "AdminAction", action = "two" }) -- a session of the old policy, still running
      new:log({ type = "AdminAction", action = "three" })
      old:stop()
      new:log({ type = "AdminAction", action = "four" })
      assert.is_false(new.webhook.stopped)
      new:stop()
      assert.is_true(new.webhook.stopped)
      local function actions(list)
        local out = {}
        for i, r in ipairs(list) do out[i] = r.action end
        return out
      end
      assert.same({ "one", "two", "three", "four" }, actions(records(path)))
      assert.same({ "one", "two", "three", "four" }, actions(records(dir .. "/wh/0000000000000001.jsonl")))
    end)
  end)

  it("start() refuses a webhook dir that another block of this process has open (a reload back to it "
    .. "while the policy that had it still retires)", function()
    H.run(function()
      local function wh(sub)
        return { url = "http://127.0.0.1:" .. H.free_port() .. "/", dir = dir .. sub, retry_min = "30s",
          retry_max = "30s" }
      end
      local first = eventlog.setup { webhook = wh("/a") }
      assert.is_true(first:start())
      local second = eventlog.setup { webhook = wh("/b") }
      assert.is_true(second:handover(first))
      assert.is_true(second:start())
      local third = eventlog.setup { webhook = wh("/a") }
      assert.is_true(third:handover(second))
      assert.same({ nil, "outbox " .. dir .. "/a is open already in this process" }, { third:start() })
      -- the first block's queue is untouched and still its own
      first:log({ type = "AdminAction", action = "still here" })
      assert.equal(1, first.webhook.outbox.stats.appended)
      first:stop()
      -- its endpoint never answered: what it leaves in its dir is said
      assert.matches("eventlog: webhook: %d+ octets of records in " .. dir:gsub("%p", "%%%0") .. "/a not sent yet",
        H.log("not sent yet"))
      second:stop()
      -- once the first has let go, the directory can be opened again
      local fourth = eventlog.setup { webhook = wh("/a") }
      assert.is_true(fourth:start())
      fourth:stop()
    end)
  end)

  it("a reload that fails after the event log started leaves the webhook with the old policy's endpoint", function()
    H.run(function()
      local ra, rb = receiver(dir .. "/a.jsonl"), receiver(dir .. "/b.jsonl")
      local ok, err = pcall(function()
        local old = eventlog.setup { webhook = { url = "http://127.0.0.1:" .. ra.port .. "/a", dir = dir .. "/wh",
          interval = 0.05 } }
        assert.is_true(old:start())
        -- the new policy's block takes the queue over, then another block fails: start_blocks() stops it
        local new = eventlog.setup { webhook = { url = "http://127.0.0.1:" .. rb.port .. "/b", dir = dir .. "/wh",
          interval = 0.05 } }
        assert.is_true(new:handover(old))
        assert.is_true(new:start())
        assert.equal("http://127.0.0.1:" .. rb.port .. "/b", old.webhook.opts.url)
        new:stop()
        assert.is_false(old.webhook.stopped)
        assert.equal("http://127.0.0.1:" .. ra.port .. "/a", old.webhook.opts.url)
        old:log({ type = "AdminAction", action = "after the failed reload" })
        assert.is_true(H.wait_for(function() return #ra.records() == 1 end, 10))
        assert.equal("after the failed reload", ra.records()[1].action)
        assert.equal("/a", ra.requests()[1].path)
        assert.equal(0, #rb.records())
        old:stop()
        assert.is_true(old.webhook.stopped)
      end)
      ra.stop()
      rb.stop()
      if not ok then error(err, 0) end
    end)
  end)

  it("reopens the file on SIGUSR1 (logrotate): new lines go to a new file", function()
    H.run(function()
      local path = dir .. "/events.jsonl"
      local policy = dir .. "/policy.lua"
      H.write(policy, [[
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = env.spool }
mta:use(require("moonpost.accept").smtp { listen = env.listen })
mta:use(require("moonpost.eventlog").setup { file = env.get("EVENTLOG_FILE"), stdout = true })
mta:run()
]])
      local proc = H.launch(policy, { MOONPOST_SPOOL = dir .. "/spool", EVENTLOG_FILE = path })
      local c, _, t = H.send(proc.port, { from = "before@client.test" })
      assert.equal(250, c, proc.log())
      local first = queued_id(t)
      assert.is_true(H.wait_for(function() return #lines_of(path) == 1 end, 10), proc.log())
      assert.is_true(os.rename(path, path .. ".1"))
      -- written to the renamed file until the signal
      c, _, t = H.send(proc.port, { from = "renamed@client.test" })
      assert.equal(250, c)
      local second = queued_id(t)
      assert.is_true(H.wait_for(function() return #lines_of(path .. ".1") == 2 end, 10))
      assert.is_nil(uv.fs_stat(path))
      uv.kill(proc.pid, "sigusr1")
      assert.is_true(H.wait_for(function() return proc.log():find("eventlog: reopened", 1, true) ~= nil end, 10),
        proc.log())
      c, _, t = H.send(proc.port, { from = "after@client.test" })
      assert.equal(250, c)
      local third = queued_id(t)
      assert.is_true(H.wait_for(function() return #lines_of(path) == 1 end, 10), proc.log())
      assert.equal(0, proc.stop())
      local old, new = records(path .. ".1"), records(path)
      assert.same({ first, second }, { old[1].id, old[2].id })
      assert.same({ "before@client.test", "renamed@client.test" }, { old[1].sender, old[2].sender })
      assert.equal(1, #new)
      assert.same({ "Reception", third, "after@client.test" }, { new[1].type, new[1].id, new[1].sender })
      assert.equal(2, python_count(path .. ".1"))
      assert.equal(1, python_count(path))
      -- stdout (mixed with the process log on stderr here) got the same lines
      local out = {}
      for line in proc.log():gmatch("[^\n]+") do
        if line:sub(1, 1) == "{" then out[#out + 1] = line end
      end
      local file = lines_of(path .. ".1")
      file[3] = lines_of(path)[1]
      assert.same(file, out)
    end, 60)
  end)

  it("a SIGHUP reload keeps one stream: the file, the webhook queue and SIGUSR1 carry on", function()
    H.run(function()
      local path = dir .. "/events.jsonl"
      local rcv = receiver(dir .. "/received.jsonl")
      local policy = dir .. "/policy.lua"
      H.write(policy, [[
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = env.spool }
mta:use(require("moonpost.accept").smtp { listen = env.listen })
mta:use(require("moonpost.eventlog").setup {
  file = env.get("EVENTLOG_FILE"),
  webhook = { url = env.get("EVENTLOG_URL"), batch = 1, interval = "100ms", dir = env.get("EVENTLOG_DIR") },
})
mta:run()
]])
      local proc = H.launch(policy, { MOONPOST_SPOOL = dir .. "/spool", EVENTLOG_FILE = path,
        EVENTLOG_URL = "http://127.0.0.1:" .. rcv.port .. "/e", EVENTLOG_DIR = dir .. "/webhook" })
      local ids = {}
      local c, _, t = H.send(proc.port, { from = "before@client.test" })
      assert.equal(250, c, proc.log())
      ids[1] = queued_id(t)
      uv.kill(proc.pid, "sighup")
      assert.is_true(H.wait_for(function() return proc.log():find("new sessions use it", 1, true) ~= nil end, 10),
        proc.log())
      -- the new block took the queue over with its lock, not a second open
      assert.equal(proc.pid .. "\n", H.read(dir .. "/webhook/LOCK"))
      c, _, t = H.send(proc.port, { from = "after@client.test" })
      assert.equal(250, c)
      ids[2] = queued_id(t)
      assert.is_true(H.wait_for(function() return #rcv.records() == 2 end, 10), proc.log())
      -- the new block's SIGUSR1
      assert.is_true(os.rename(path, path .. ".1"))
      uv.kill(proc.pid, "sigusr1")
      assert.is_true(H.wait_for(function() return proc.log():find("eventlog: reopened", 1, true) ~= nil end, 10),
        proc.log())
      c, _, t = H.send(proc.port, { from = "rotated@client.test" })
      assert.equal(250, c)
      ids[3] = queued_id(t)
      assert.is_true(H.wait_for(function() return #lines_of(path) == 1 and #rcv.records() == 3 end, 10), proc.log())
      assert.equal(0, proc.stop())
      rcv.stop()
      local old, new = records(path .. ".1"), records(path)
      assert.same({ ids[1], ids[2] }, { old[1].id, old[2].id })
      assert.equal(ids[3], new[1].id)
      local got = rcv.records()
      assert.same(ids, { got[1].id, got[2].id, got[3].id })
      assert.is_nil(proc.log():find("error", 1, true), proc.log())
    end, 60)
  end)

  it("webhook: a queue directory is one process's: a second process on it fails to start, naming the first",
    function()
    H.run_killing(function()
      local policy = dir .. "/policy.lua"
      H.write(policy, [[
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = env.spool }
mta:use(require("moonpost.accept").smtp { listen = env.listen })
mta:use(require("moonpost.eventlog").setup {
  webhook = { url = env.get("EVENTLOG_URL"), dir = env.get("EVENTLOG_DIR"), retry_min = "1m", retry_max = "1m" },
})
mta:run()
]])
      local wh = dir .. "/webhook"
      local e = { EVENTLOG_URL = "http://127.0.0.1:" .. H.free_port() .. "/e", EVENTLOG_DIR = wh,
        MOONPOST_SPOOL = dir .. "/spool-a" }
      local a = H.launch(policy, e)
      assert.is_false((a.exited()), a.log())
      local c, _, t = H.send(a.port, { from = "first@client.test" })
      assert.equal(250, c)
      local ids = { queued_id(t) }
      e.MOONPOST_SPOOL = dir .. "/spool-b"
      local b = H.launch(policy, e)
      assert.is_true(H.wait_for(function() return (b.exited()) end, 15), b.log())
      assert.equal(1, select(2, b.exited()))
      assert.matches(string.format("outbox %s is locked by another process (pid %d; lock file %s/LOCK)", wh, a.pid,
        wh), b.log(), 1, true)
      -- the first process's queue is whole, and it goes on appending to it
      c, _, t = H.send(a.port, { from = "second@client.test" })
      assert.equal(250, c)
      ids[2] = queued_id(t)
      local got = {}
      for _, r in ipairs(of_type(records(wh .. "/0000000000000001.jsonl"), "Reception")) do got[#got + 1] = r.id end
      assert.same(ids, got)
      assert.equal(0, a.stop())
      -- the lock went with it: the next process takes the queue over
      local again = H.launch(policy, e)
      assert.is_false((again.exited()), again.log())
      assert.is_true(H.wait_for(function()
        return again.log():find("eventlog: webhook: %d+ octets of records from before the restart") ~= nil
      end, 10), again.log())
      assert.equal(0, again.stop())
    end, 60)
  end)

  it("webhook: every record reaches a receiver that was down for part of the run, and the queued ones "
    .. "arrive after a SIGKILL and a restart", function()
    H.with_sink(nil, function(sink)
      local path = dir .. "/events.jsonl"
      local out = dir .. "/received.jsonl"
      local wport = H.free_port()
      local policy = dir .. "/policy.lua"
      H.write(policy, [[
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = env.spool, queue = { retry = { "1s" } } }
mta:use(require("moonpost.accept").smtp { listen = env.listen })
mta:use(require("moonpost.eventlog").setup {
  file = env.get("EVENTLOG_FILE"),
  webhook = { url = env.get("EVENTLOG_URL"), batch = 5, interval = "200ms", dir = env.get("EVENTLOG_DIR"),
    retry_min = "200ms", retry_max = "1s", headers = { Authorization = "Bearer t0ken" } },
})
mta:use(require("moonpost.route").smtp { relay = env.relay, idle_timeout = "1s" })
mta:run()
]])
      local envv = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_RELAY = "127.0.0.1:" .. sink.port,
        EVENTLOG_FILE = path, EVENTLOG_URL = "http://127.0.0.1:" .. wport .. "/events",
        EVENTLOG_DIR = dir .. "/webhook" }
      local proc = H.launch(policy, envv)
      local cur = proc
      local acked = {}
      local function send_batch(n, tag)
        for i = 1, n do
          local to = (i % 4 == 0) and ("r550-" .. tag .. i .. "@x.test") or (tag .. i .. "@x.test")
          local c, _, t = H.send(cur.port, { from = tag .. i .. "@client.test", to = to })
          assert.equal(250, c, cur.log())
          acked[#acked + 1] = queued_id(t)
        end
      end
      -- 1. the receiver is down: the records wait in the queue
      send_batch(8, "a")
      -- 8 receptions, 6 deliveries, 2 bounces, 2 DSNs and their 2 deliveries
      assert.is_true(H.wait_for(function() return #lines_of(path) >= 20 end, 20), proc.log())
      assert.is_true(H.wait_for(function() return proc.log():find("webhook: POST", 1, true) ~= nil end, 10))
      assert.truthy(proc.log():find("ECONNREFUSED", 1, true), proc.log())
      -- 2. it comes up (refusing its first two requests with 503): everything arrives
      local rcv = receiver(out, wport, 2)
      assert.is_true(H.wait_for(function() return #rcv.records() >= #lines_of(path) end, 20), proc.log())
      -- 3. down again; more mail; Moonpost killed with records still queued
      rcv.stop()
      send_batch(4, "b")
      local before_kill
      assert.is_true(H.wait_for(function()
        before_kill = records(path)
        return #of_type(before_kill, "Reception") >= 12 and #of_type(before_kill, "Delivery") >= 12
          and #of_type(before_kill, "DSN") >= 3
      end, 20), proc.log())
      proc.kill()
      local received_before = #rcv.records()
      -- 4. restarted, with the receiver up: the queued records arrive
      rcv = receiver(out, wport)
      local proc2 = H.launch(policy, envv)
      cur = proc2
      assert.is_true(H.wait_for(function() return proc2.log():find("records from before the restart", 1, true) end,
        10), proc2.log())
      local want = {}
      local function all_arrived()
        local got = {}
        for _, r in ipairs(rcv.records()) do got[key(r)] = (got[key(r)] or 0) + 1 end
        for _, r in ipairs(records(path)) do
          if not got[key(r)] then return false, r end
        end
        want = got
        return true
      end
      assert.is_true(H.wait_for(all_arrived, 30), proc2.log())
      local received_restart = #rcv.records()
      -- 5. killed again while the receiver holds a batch it has recorded but
      -- not answered yet: that batch is sent again after the restart
      rcv.stop()
      rcv = receiver(out, wport, nil, 1)
      send_batch(3, "c")
      assert.is_true(H.wait_for(function() return #rcv.records() > received_restart end, 20), proc2.log())
      proc2.kill()
      local proc3 = H.launch(policy, envv)
      cur = proc3
      assert.is_true(H.wait_for(all_arrived, 30), proc3.log())
      assert.is_true(H.wait_for(function()
        for _, r in ipairs(of_type(rcv.records(), "Reception")) do
          if r.sender == "c3@client.test" then return true end
        end
      end, 30), proc3.log())
      all_arrived()
      assert.equal(0, proc3.stop())
      rcv.stop()
      -- every message that got a 250 has its Reception at the receiver
      local webhook = rcv.records()
      local recv_ids = {}
      for _, r in ipairs(of_type(webhook, "Reception")) do recv_ids[r.id] = true end
      for _, id in ipairs(acked) do assert.is_true(recv_ids[id], "no Reception for " .. id) end
      -- every record of the file arrived; duplicates are allowed, and counted
      local dups = 0
      for _, n in pairs(want) do dups = dups + (n - 1) end
      local file_recs = records(path)
      assert.is_true(#webhook >= #file_recs)
      assert.is_true(dups >= 1, "the batch in flight at the second kill was sent again")
      print(string.format("\n  webhook: %d records in the file, %d received (%d before the first kill), "
        .. "%d duplicates", #file_recs, #webhook, received_before, dups))
      -- the requests: JSON arrays of at most 5, with the configured header
      local reqs = rcv.requests()
      assert.is_true(#reqs >= 5)
      for _, q in ipairs(reqs) do
        assert.is_nil(q.error)
        assert.equal("/events", q.path)
        assert.equal("application/json", q.content_type)
        assert.equal("Bearer t0ken", q.authorization)
        assert.equal(tostring(q.n), q.events_header)
        assert.is_true(q.n >= 1 and q.n <= 5)
      end
      assert.equal(#webhook, python_count(out))
    end, 120)
  end)
end)

describe("runtime/outbox", function()
  local outbox = require "moonpost.runtime.outbox"
  local dir
  before_each(function() dir = H.tmpdir("moonpost-outbox") end)
  after_each(function() H.rm_rf(dir) end)

  local function segments()
    local out = {}
    for _, f in ipairs(H.ls(dir)) do if f:match("%.jsonl$") then out[#out + 1] = f end end
    return out
  end

  it("reads in order across segments, and deletes a segment once the cursor has passed it", function()
    H.run(function()
      local ob = assert(outbox.open({ dir = dir, segment_size = 4096 }))
      local line = string.rep("x", 1000)
      for i = 1, 10 do assert.is_true(ob:append(i .. line)) end
      assert.equal(3, #segments())
      local got = {}
      while #got < 10 do
        local b = assert(ob:read(4))
        assert.is_true(b.n > 0)
        for i = 1, b.n do got[#got + 1] = tonumber(b[i]:match("^(%d+)")) end
        assert.is_true(ob:ack(b))
      end
      assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, got)
      assert.equal(0, ob:read(4).n)
      assert.equal(1, #segments())
      assert.equal(0, ob:backlog())
      ob:close()
      ob:close_reader()
      -- reopened: nothing left to read, new lines after the cursor
      ob = assert(outbox.open({ dir = dir, segment_size = 4096 }))
      assert.equal(0, ob:read(4).n)
      ob:append("eleven")
      local b = ob:read(4)
      assert.same({ n = 1, "eleven" }, { n = b.n, b[1] })
      ob:close()
      ob:close_reader()
    end)
  end)

  it("cuts a torn last line at open, and reads everything again when the cursor is damaged", function()
    H.run(function()
      local ob = assert(outbox.open({ dir = dir }))
      for i = 1, 3 do ob:append('{"n":' .. i .. "}") end
      local b = ob:read(2)
      assert.is_true(ob:ack(b))
      ob:close()
      ob:close_reader()
      -- a crash in the middle of a write
      local seg = dir .. "/" .. segments()[1]
      local f = assert(io.open(seg, "ab"))
      f:write('{"n":4, "cut')
      f:close()
      ob = assert(outbox.open({ dir = dir }))
      assert.truthy(H.log("cut a torn last line"))
      ob:append('{"n":5}')
      b = ob:read(10)
      assert.same({ '{"n":3}', '{"n":5}' }, { b[1], b[2] })
      ob:close()
      ob:close_reader()
      -- the cursor damaged: from the start again (duplicates, nothing lost)
      H.write(dir .. "/cursor", "garbage")
      ob = assert(outbox.open({ dir = dir }))
      b = ob:read(10)
      assert.same({ '{"n":1}', '{"n":2}', '{"n":3}', '{"n":5}' }, { b[1], b[2], b[3], b[4] })
      assert.equal(4, b.n)
      ob:close()
      ob:close_reader()
    end)
  end)

  it("open() locks the directory until close(): a second open is refused, in this process or another", function()
    H.run(function()
      local ob = assert(outbox.open({ dir = dir }))
      assert.equal(uv.os_getpid() .. "\n", H.read(dir .. "/LOCK"))
      local none, err = outbox.open({ dir = dir .. "/" })
      assert.is_nil(none)
      assert.equal("outbox " .. dir .. "/ is open already in this process", err)
      -- what another process gets: the lock's own message, naming the holder
      local code, _, stderr = H.exec("luajit", { "-e", [[
package.cpath = os.getenv("ROOT") .. "/build/lib/?.so;" .. package.cpath
local ok, err = require("moonpost.core.spool").lock(os.getenv("DIR"), "outbox")
io.stderr:write(tostring(err))
os.exit(ok and 0 or 1)]] }, { timeout = 30, env = { ROOT = H.root, DIR = dir } })
      assert.equal(1, code)
      assert.equal(string.format("outbox %s is locked by another process (pid %d; lock file %s/LOCK)", dir,
        uv.os_getpid(), dir), stderr)
      ob:close()
      ob:close_reader()
      ob = assert(outbox.open({ dir = dir }))
      ob:close()
      ob:close_reader()
    end)
  end)

  it("a full disk that its own sent lines fill, in one segment: they are deleted and appends go on", function()
    H.run(function()
      on_tmpfs(dir, "64k", function(mnt)
        -- the default 16 MiB segment is larger than the disk
        local ob = assert(outbox.open({ dir = mnt .. "/q" }))
        local line = string.rep("a", 99)
        local n = 0
        while ob:append(line) do n = n + 1 end
        assert.is_true(n > 0)
        -- every line is sent and acknowledged (the cursor cannot be written: the disk is full)
        local got = 0
        while true do
          local b = assert(ob:read(100))
          if b.n == 0 then break end
          got = got + b.n
          ob:ack(b)
        end
        assert.equal(n, got)
        local after = string.rep("b", 99)
        assert.is_true(ob:append(after))
        local b = assert(ob:read(100))
        assert.same({ n = 1, after }, { n = b.n, b[1] })
        ob:close()
        ob:close_reader()
        -- reopened: the line not yet acknowledged is read again, and only it
        ob = assert(outbox.open({ dir = mnt .. "/q" }))
        b = assert(ob:read(100))
        assert.same({ n = 1, after }, { n = b.n, b[1] })
        ob:close()
        ob:close_reader()
      end)
    end)
  end)

  it("refuses appends beyond max_size", function()
    H.run(function()
      local ob = assert(outbox.open({ dir = dir, max_size = 100 }))
      assert.is_true(ob:append(string.rep("a", 60)))
      assert.same({ nil, "full" }, { ob:append(string.rep("b", 60)) })
      assert.equal(1, ob.stats.refused)
      ob:close()
      ob:close_reader()
    end)
  end)
end)
