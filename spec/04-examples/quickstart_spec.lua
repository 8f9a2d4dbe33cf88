-- examples/quickstart.lua through the launcher, with real clients: swaks,
-- Debian's python3 smtplib and Postfix's smtp-source. Every message is
-- counted in the Maildir.
local H = require "helpers"
local uv = require "luv"

local QUICKSTART = H.root .. "/examples/quickstart.lua"

local function maildir_files(root, user)
  return H.ls(root .. "/" .. user .. "/new")
end

describe("examples/quickstart.lua", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-qs") end)
  after_each(function() H.rm_rf(dir) end)

  it("runs from a fresh directory with the default paths (./var/spool, ./var/mail)", function()
    H.run(function()
      local srv = H.launch(QUICKSTART, { MOONPOST_MAILDIR = false, MOONPOST_SPOOL = false }, { cwd = dir })
      local code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. srv.port, "--to", "someone@example.com" },
        { timeout = 30 })
      assert.equal(0, code, out)
      assert.is_true(H.wait_for(function() return #maildir_files(dir .. "/var/mail", "someone") == 1 end))
      assert.equal(0, srv.stop())
      assert.is_truthy(uv.fs_stat(dir .. "/var/spool/LOCK"))
    end)
  end)

  it("make run starts it (README's first command)", function()
    H.run(function()
      local port = H.free_port()
      local logbuf, exited = {}, false
      -- two pipes: luv crashes when one pipe serves both stdout and stderr
      local out, errp = uv.new_pipe(false), uv.new_pipe(false)
      local env = {}
      for k, v in pairs(uv.os_environ()) do env[#env + 1] = k .. "=" .. v end
      env[#env + 1] = "MOONPOST_LISTEN=127.0.0.1:" .. port
      env[#env + 1] = "MOONPOST_SPOOL=" .. dir .. "/spool"
      env[#env + 1] = "MOONPOST_MAILDIR=" .. dir .. "/mail"
      local http_port = H.free_port()
      env[#env + 1] = "MOONPOST_HTTP=127.0.0.1:" .. http_port
      local handle, pid
      handle, pid = uv.spawn("make", { args = { "-s", "run" }, cwd = H.root, env = env, stdio = { nil, out, errp },
        detached = true }, function() exited = true handle:close() end)
      assert(handle, pid)
      for _, pp in ipairs({ out, errp }) do
        pp:read_start(function(_, chunk) if chunk then logbuf[#logbuf + 1] = chunk else pp:close() end end)
      end
      local up = H.wait_for(function() return table.concat(logbuf):find("listening smtp", 1, true) ~= nil end, 120)
      local code, swaks = H.exec("swaks", { "--server", "127.0.0.1:" .. port, "--to", "someone@example.com" },
        { timeout = 30 })
      local delivered = H.wait_for(function() return #maildir_files(dir .. "/mail", "someone") == 1 end)
      -- the health endpoints answer on MOONPOST_HTTP
      local http = require "moonpost.runtime.http"
      local hstatus, hbody = http.request("127.0.0.1", http_port, "GET", "/readyz")
      uv.kill(-pid, "sigterm") -- make and the server it started
      H.wait_for(function() return exited end, 30)
      assert.is_true(up, table.concat(logbuf))
      assert.equal(0, code, swaks)
      assert.is_true(delivered)
      assert.equal(200, hstatus, tostring(hbody))
      assert.matches('"status":"ready"', hbody)
    end, 180)
  end)

  it("swaks leaves the message in the Maildir (plain and PIPELINING)", function()
    H.run(function()
      local srv = H.launch(QUICKSTART, { MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_SPOOL = dir .. "/spool" })
      local code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. srv.port, "--to", "someone@example.com",
        "--from", "sender@example.org", "--header", "Subject: plain swaks" }, { timeout = 30 })
      assert.equal(0, code, out)
      assert.truthy(out:find("250 2.0.0 Ok: queued as", 1, true))
      code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. srv.port, "--to", "someone@example.com",
        "--from", "sender@example.org", "--pipeline", "--header", "Subject: pipelined swaks" }, { timeout = 30 })
      assert.equal(0, code, out)
      assert.truthy(out:find("PIPELINING", 1, true))
      assert.is_true(H.wait_for(function() return #maildir_files(dir .. "/mail", "someone") == 2 end))
      assert.equal(0, srv.stop())
      local files = maildir_files(dir .. "/mail", "someone")
      assert.equal(2, #files)
      local subjects = {}
      for _, f in ipairs(files) do
        local m = H.read(dir .. "/mail/someone/new/" .. f)
        assert.matches("^Received: from ", m)
        subjects[#subjects + 1] = m:match("Subject: ([^\r\n]+)")
        -- S=<size> in the name is the file's size (Maildir++)
        assert.equal(#m, tonumber(f:match(",S=(%d+)$")))
      end
      table.sort(subjects)
      assert.same({ "pipelined swaks", "plain swaks" }, subjects)
      local st = uv.fs_stat(dir .. "/mail/someone/new/" .. files[1])
      assert.equal(tonumber("600", 8), st.mode % 512)
    end)
  end)

  it("python smtplib: EHLO features, SIZE, SMTPUTF8 and DSN parameters", function()
    H.run(function()
      local srv = H.launch(QUICKSTART, { MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_SPOOL = dir .. "/spool" })
      local script = [[
import json, smtplib, sys
port = int(sys.argv[1])
out = {}
s = smtplib.SMTP("127.0.0.1", port, local_hostname="py.client.test")
code, _ = s.ehlo()
out["ehlo"] = code
out["features"] = sorted(s.esmtp_features.keys())
out["size"] = s.esmtp_features.get("size")
msg = b"Subject: sized\r\n\r\nhello\r\n"
# smtplib adds SIZE=<len> itself when the server offers SIZE
s.sendmail("a@py.test", ["sized@example.com"], msg)
code, resp = s.mail("a@py.test", ["SIZE=99999999999"])
out["big"] = [code, resp.decode()]
s.rset()
umsg = "Subject: ünï\r\n\r\nčau ✓\r\n".encode("utf-8")
s.sendmail("josé@ejemplo.es", ["üser@exämple.com"], umsg, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
s.sendmail("dsn@py.test", ["dsn@example.com"], b"Subject: dsn\r\n\r\nx\r\n",
           mail_options=["RET=HDRS", "ENVID=abc123"],
           rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;dsn+40example.com"])
try:
    s.sendmail("a@py.test", ["x@example.com"], b"x\r\n", rcpt_options=["NOTIFY=BOGUS"])
    out["bad_notify"] = "accepted"
except smtplib.SMTPRecipientsRefused as e:
    r = e.recipients["x@example.com"]
    out["bad_notify"] = [r[0], r[1].decode()]
s.quit()
print(json.dumps(out))
]]
      local code, out, err = H.exec(H.python, { "-c", script, tostring(srv.port) }, { timeout = 60 })
      assert.equal(0, code, err)
      local r = require("cjson").decode(out)
      assert.equal(250, r.ehlo)
      for _, f in ipairs({ "8bitmime", "chunking", "dsn", "enhancedstatuscodes", "pipelining", "size", "smtputf8" }) do
        local found = false
        for _, g in ipairs(r.features) do found = found or g == f end
        assert.is_true(found, f)
      end
      assert.equal("52428800", r.size)
      assert.equal(552, r.big[1])
      assert.matches("^5%.3%.4", r.big[2])
      assert.equal(501, r.bad_notify[1])
      assert.matches("^5%.5%.4", r.bad_notify[2])
      assert.is_true(H.wait_for(function() return #maildir_files(dir .. "/mail", "üser") == 1 end))
      -- NOTIFY=SUCCESS: the final delivery is reported to the sender,
      -- dsn@py.test, which the quickstart stores in the "dsn" folder too
      assert.is_true(H.wait_for(function() return #maildir_files(dir .. "/mail", "dsn") == 2 end))
      assert.equal(0, srv.stop())
      assert.equal(1, #maildir_files(dir .. "/mail", "sized"))
      local reports = 0
      for _, f in ipairs(maildir_files(dir .. "/mail", "dsn")) do
        local text = H.read(dir .. "/mail/dsn/new/" .. f)
        if text:find("Action: delivered", 1, true) then
          reports = reports + 1
          assert.truthy(text:find("Final-Recipient: rfc822; dsn@example.com", 1, true))
          assert.truthy(text:find("Original-Recipient: rfc822;dsn@example.com", 1, true))
        end
      end
      assert.equal(1, reports)
      local ufiles = maildir_files(dir .. "/mail", "üser")
      assert.equal(1, #ufiles)
      local m = H.read(dir .. "/mail/üser/new/" .. ufiles[1])
      assert.truthy(m:find("čau ✓", 1, true))
      assert.truthy(m:find("with UTF8SMTP", 1, true))
    end)
  end)

  it("smtp-source -d -s 20 -m 5000: every message is in the Maildir", function()
    H.run(function()
      local srv = H.launch(QUICKSTART, { MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_SPOOL = dir .. "/spool" })
      local code, out, err = H.exec("smtp-source", { "-d", "-s", "20", "-m", "5000", "-l", "1000",
        "-f", "load@source.test", "-t", "bulk@example.com", "127.0.0.1:" .. srv.port }, { timeout = 300 })
      assert.equal(0, code, out .. err)
      -- delivery runs from the spool after the 250: wait for it (bounded)
      H.wait_for(function() return #maildir_files(dir .. "/mail", "bulk") >= 5000 end, 120)
      assert.equal(0, srv.stop())
      local files = maildir_files(dir .. "/mail", "bulk")
      assert.equal(5000, #files)
      assert.same({}, H.ls(dir .. "/mail/bulk/tmp"))
      local log = srv.log()
      local n = 0
      for _ in log:gmatch("from=<load@source%.test>") do n = n + 1 end
      assert.equal(5000, n)
    end, 400)
  end)

  it("writes no file for a local part that tries to leave the Maildir root", function()
    H.run(function()
      local srv = H.launch(QUICKSTART, { MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_SPOOL = dir .. "/spool" })
      local code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. srv.port,
        "--to", '"../../escape"@example.com', "--from", "a@b.c" }, { timeout = 30 })
      assert.equal(0, code, out)
      -- swaks exits non-zero when the recipient is refused
      code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. srv.port,
        "--to", "..@example.com", "--from", "a@b.c" }, { timeout = 30 })
      assert.are_not.equal(0, code)
      H.wait_for(function() return #H.ls(dir .. "/mail/_._.._escape/new") == 1 end)
      srv.stop()
      -- the quoted local part is stored under a folder inside the root
      local entries = {}
      local req = uv.fs_scandir(dir .. "/mail")
      while true do
        local name = uv.fs_scandir_next(req)
        if not name then break end
        entries[#entries + 1] = name
      end
      table.sort(entries)
      assert.same({ "_._.._escape" }, entries)
      assert.is_nil(uv.fs_stat(dir .. "/escape"))
      assert.is_nil(uv.fs_stat(dir .. "/../escape"))
      -- "..@" is not a valid dot-string and was refused at RCPT
      assert.truthy(out:find("553 5.1.3", 1, true))
    end)
  end)
end)
