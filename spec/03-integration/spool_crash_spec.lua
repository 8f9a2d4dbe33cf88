-- Nothing acknowledged is lost: 50 sessions inject 20,000 messages while
-- the server is SIGKILLed at random moments, five times, and once in the
-- middle of a compaction. Afterwards every message that got a 250 has been
-- delivered or is still queued; duplicates (messages whose delivery was in
-- flight at a kill) are counted and reported.
local H = require "helpers"
local sched = require "moonpost.runtime.sched"
local cjson = require "cjson"

local TOTAL = tonumber(os.getenv("CRASH_MESSAGES") or "") or 20000
local SESSIONS = 50

describe("spool under SIGKILL", function()
  it("keeps every acknowledged message through kills at random moments and during compaction", function()
    local dir = H.tmpdir("moonpost-crash")
    H.run(function()
      local env = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail" }
      require("luv").fs_mkdir(dir .. "/mail", 448)
      H.write(dir .. "/mail/.blocked", "a file, so that defer-* folders cannot be made\n")
      local policy = H.root .. "/spec/fixtures/policies/crash.lua"
      local port = H.free_port()
      local srv = H.launch(policy, env, { port = port })
      local logs = {}

      local inj = H.inject({ port = port, sessions = SESSIONS, total = TOTAL, rcpt = function(seq, tok)
        return (seq % 20 == 0) and ("defer-" .. tok .. "@x.test") or "sink@x.test"
      end })
      local acked = inj.acked

      -- five kills at random moments
      math.randomseed(os.time())
      local kills = 0
      for _ = 1, 5 do
        sched.sleep(0.3 + math.random() * 1.2)
        if inj.nacked >= TOTAL then break end
        srv.kill()
        kills = kills + 1
        logs[#logs + 1] = srv.log()
        srv = H.launch(policy, env, { port = port })
      end
      -- one kill in the middle of a compaction
      local fenv = { MOONPOST_SPOOL_FAULT = "compaction_pause=5" }
      for k, v in pairs(env) do fenv[k] = v end
      srv.kill()
      logs[#logs + 1] = srv.log()
      srv = H.launch(policy, fenv, { port = port })
      local paused = H.wait_for(function() return srv.log():find("compaction paused", 1, true) ~= nil end, 60)
      assert.is_true(paused, "no compaction happened under load:\n" .. srv.log())
      srv.kill()
      kills = kills + 2
      logs[#logs + 1] = srv.log()
      srv = H.launch(policy, env, { port = port })

      local finished = H.wait_for(function() return inj.running == 0 end, 300)
      assert.is_true(finished, string.format("injection did not finish: %d acknowledged\n%s", inj.nacked,
        srv.log():sub(-3000)))

      -- every acknowledged message: delivered, or queued (defer-*)
      local want_sink = 0
      for _, r in pairs(acked) do if r == "sink@x.test" then want_sink = want_sink + 1 end end
      local function delivered_files() return #H.ls(dir .. "/mail/sink/new") end
      H.wait_for(function() return delivered_files() >= want_sink end, 180)
      sched.sleep(0.5)
      srv.stop()
      logs[#logs + 1] = srv.log()

      local seen = {}
      for _, f in ipairs(H.ls(dir .. "/mail/sink/new")) do
        local tok = H.read(dir .. "/mail/sink/new/" .. f):match("\r\nSubject: (t[%d%-]+)\r\n")
        seen[tok] = (seen[tok] or 0) + 1
      end
      local code, out, err = H.exec(H.root .. "/scripts/moonpost", { "spool", "list", dir .. "/spool", "--json" })
      assert.equal(0, code, err)
      local queued = {}
      for _, m in ipairs(cjson.decode(out).messages) do
        queued[m.from:match("^(.-)@")] = (queued[m.from:match("^(.-)@")] or 0) + 1
      end
      local lost, dups, delivered_twice_queued = {}, 0, 0
      for tok, rcpt in pairs(acked) do
        if rcpt == "sink@x.test" then
          if not seen[tok] then lost[#lost + 1] = tok end
        elseif not queued[tok] then
          lost[#lost + 1] = tok
        end
      end
      for _, n in pairs(seen) do if n > 1 then dups = dups + n - 1 end end
      for _, n in pairs(queued) do if n > 1 then delivered_twice_queued = delivered_twice_queued + 1 end end
      local all = table.concat(logs)
      local torn = select(2, all:gsub("torn tail", ""))
      local compactions = select(2, all:gsub("compacted %d+%.seg", ""))
      print(string.format("\ncrash spec: %d acknowledged (%d sent), %d kills, %d lost, %d duplicate deliveries, "
        .. "%d queued, %d torn tails truncated, %d compactions", inj.nacked, inj.sent, kills, #lost, dups,
        #(cjson.decode(out).messages), torn, compactions))
      assert.same({}, lost)
      assert.equal(0, delivered_twice_queued)
      -- a duplicate needs its delivery in flight at a kill: at most the queue's
      -- concurrency per kill
      assert.is_true(dups <= kills * 50, dups .. " duplicates")
    end, 600)
    H.rm_rf(dir)
  end)
end)
