-- moonpost.core.dkim and moonpost.runtime.dkim. Every signature made here
-- is checked by an independent verifier, python3-dkim (Debian's
-- /usr/bin/python3), through spec/fixtures/dkim/verify.py.
local dkim = require "moonpost.core.dkim"
local smtp = require "moonpost.core.smtp"
local cjson = require "cjson"
local uv = require "luv"
local H = require "helpers"

local FIX = H.root .. "/spec/fixtures/dkim/"

local MSG = table.concat({
  "From: Joe SixPack <joe@football.example.com>",
  "To: Suzie Q <suzie@shopping.example.net>",
  "Subject: Is dinner ready?",
  "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
  "Message-ID: <20030712040037.46341.5F8J@football.example.com>",
  "X-Folded: one",
  "  two\tthree  ",
  "",
  "Hi.",
  "",
  "We lost the game.  Are you hungry yet?  ",
  "",
  "Joe.",
  "",
  "",
}, "\r\n")

local function key(name) return assert(dkim.load_key(FIX .. name)) end

local KEYS = {}
local function keys()
  if not KEYS.rsa2048 then
    KEYS.rsa1024, KEYS.rsa2048, KEYS.rsa4096 = key("rsa1024.pem"), key("rsa2048.pem"), key("rsa4096.pem")
    KEYS.pkcs1, KEYS.ed25519, KEYS.ed25519b = key("rsa2048-pkcs1.pem"), key("ed25519.pem"), key("ed25519-b.pem")
  end
  return KEYS
end

-- The DNS the verifiers see: query -> TXT record.
local function dns(list)
  local t = {}
  for _, e in ipairs(list) do t[e[1] .. "._domainkey." .. e[2]] = e[3]:txt() end
  return t
end

-- Sign synchronously (core signer, no loop): headers | nil, err.
local function sign(signer, msg, specs)
  local id, err = signer:submit(msg, specs)
  if not id then return nil, err end
  for _ = 1, 3000 do
    local r = signer:collect()[1]
    if r then
      assert.equal(id, r[1])
      return r[2], r[3]
    end
    uv.sleep(2)
  end
  error("signer did not finish")
end

-- python3-dkim's verdicts: for each message, a list of booleans (one per signature).
local tmp
local function pyverify(messages, keytable)
  local files = {}
  for i, m in ipairs(messages) do
    files[i] = string.format("%s/m%d.eml", tmp, i)
    H.write(files[i], m)
  end
  H.write(tmp .. "/keys.json", cjson.encode(keytable))
  local cmd = string.format("%s %sverify.py %s/keys.json %s 2>&1", H.python, FIX, tmp, table.concat(files, " "))
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local ok, res = pcall(cjson.decode, out)
  assert(ok and type(res) == "table", "verify.py: " .. out)
  return res
end

local function pysign(msgfile, keyfile, domain, selector, canon, alg, length, sign_dkim)
  local cmd = string.format("%s %ssign.py %s %s %s %s %s %s %s %s 2>&1", H.python, FIX, msgfile, keyfile, domain,
    selector, canon, alg, length and "length" or "-", sign_dkim and "dkim-signature" or "")
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  assert(out:match("^DKIM%-Signature:"), "sign.py: " .. out)
  return out
end

-- The fields of a block of header lines.
local function split_fields(block)
  local out = {}
  for line in block:gmatch("([^\n]*\n)") do
    if line:match("^[ \t]") and #out > 0 then out[#out] = out[#out] .. line else out[#out + 1] = line end
  end
  return out
end

local function tags(headers)
  local v = headers:gsub("\r\n[ \t]+", " ")
  local t = {}
  for name, value in v:gmatch("([%w_]+)=([^;]*)") do t[name] = value:gsub("%s", "") end
  return t
end

describe("moonpost.core.dkim", function()
  local signer
  before_each(function()
    tmp = H.tmpdir("moonpost-dkim")
  end)
  after_each(function()
    if signer then signer:close() end
    signer = nil
    H.rm_rf(tmp)
  end)

  describe("keys", function()
    it("load_key() reads RSA 1024 to 4096 (PKCS#8 and PKCS#1) and Ed25519 PEM keys", function()
      local k = keys()
      assert.same({ "rsa", 1024 }, { k.rsa1024:info().type, k.rsa1024:info().bits })
      assert.same({ "rsa", 2048 }, { k.rsa2048:info().type, k.rsa2048:info().bits })
      assert.same({ "rsa", 4096 }, { k.rsa4096:info().type, k.rsa4096:info().bits })
      assert.same({ "rsa", 2048 }, { k.pkcs1:info().type, k.pkcs1:info().bits })
      assert.same({ "ed25519", 256 }, { k.ed25519:info().type, k.ed25519:info().bits })
      assert.equal(FIX .. "rsa2048.pem", k.rsa2048:name())
    end)

    it("info().public is the SubjectPublicKeyInfo (RSA) or the bare 32-octet key (Ed25519), as openssl gives them", function()
      local function openssl(file, tail)
        local p = io.popen(string.format("openssl pkey -in %s -pubout -outform DER | %s base64 -w0", file,
          tail and "tail -c 32 |" or ""))
        local s = p:read("*a")
        p:close()
        return s
      end
      local k = keys()
      assert.equal(openssl(FIX .. "rsa2048.pem"), k.rsa2048:info().public)
      assert.equal(openssl(FIX .. "rsa2048-pkcs1.pem"), k.pkcs1:info().public)
      assert.equal(openssl(FIX .. "ed25519.pem", true), k.ed25519:info().public)
      assert.equal(44, #k.ed25519:info().public)
      assert.equal("v=DKIM1; k=rsa; p=" .. k.rsa2048:info().public, k.rsa2048:txt())
      assert.equal("v=DKIM1; k=ed25519; p=" .. k.ed25519:info().public, k.ed25519:txt())
    end)

    it("load_key() refuses what it cannot sign with, naming the file and the reason", function()
      local function refused(name, why)
        local k, err = dkim.load_key(FIX .. name)
        assert.is_nil(k)
        assert.equal(FIX .. name .. ": " .. why, err)
      end
      refused("rsa512.pem", "RSA key of 512 bits; 1024 to 4096 are supported")
      refused("ec256.pem", "EC key; RSA (1024 to 4096 bits) and Ed25519 keys are supported")
      refused("rfc8463.eml", "not a PEM private key")
      refused("missing.pem", "No such file or directory")
      H.write(tmp .. "/pub.pem", io.popen("openssl pkey -in " .. FIX .. "rsa2048.pem -pubout"):read("*a"))
      local k, err = dkim.load_key(tmp .. "/pub.pem")
      assert.is_nil(k)
      assert.matches("pub.pem: not a PEM private key", err, 1, true)
      H.write(tmp .. "/bad.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
      assert.same({ nil, tmp .. "/bad.pem: not a PEM private key" }, { dkim.load_key(tmp .. "/bad.pem") })
      os.execute("openssl genpkey -algorithm ed25519 -aes256 -pass pass:x -out " .. tmp .. "/enc.pem 2>/dev/null")
      k, err = dkim.load_key(tmp .. "/enc.pem")
      assert.is_nil(k)
      assert.matches("enc.pem: an encrypted key", err, 1, true)
    end)

    it("key_from_pem() names the key in its errors", function()
      local k = assert(dkim.key_from_pem(H.read(FIX .. "ed25519.pem"), "tenant-a/s1"))
      assert.equal("ed25519", k:info().type)
      assert.equal("tenant-a/s1", k:name())
      assert.same({ nil, "inline: not a PEM private key" }, { dkim.key_from_pem("hello", "inline") })
      assert.same({ nil, "x: RSA key of 512 bits; 1024 to 4096 are supported" },
        { dkim.key_from_pem(H.read(FIX .. "rsa512.pem"), "x") })
      assert.has_error(function() dkim.key_from_pem() end)
    end)
  end)

  describe("signer", function()
    local CANONS = { "relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed" }

    for _, engine in ipairs({ "libopendkim", "openssl" }) do
      it("signs with RSA-1024, RSA-2048, RSA-4096 and Ed25519 in every canonicalization (rsa = " .. engine
        .. "), and python3-dkim verifies", function()
        local k = keys()
        signer = dkim.signer { threads = 2, rsa = engine }
        local msgs, list = {}, {}
        for _, kn in ipairs({ "rsa1024", "rsa2048", "rsa4096", "pkcs1", "ed25519" }) do
          list[#list + 1] = { kn, "football.example.com", k[kn] }
          for _, c in ipairs(CANONS) do
            local h = assert(sign(signer, MSG, { { key = k[kn], domain = "football.example.com", selector = kn,
              canon = c } }))
            local t = tags(h)
            assert.equal(c, t.c)
            assert.equal(k[kn]:info().type == "rsa" and "rsa-sha256" or "ed25519-sha256", t.a)
            msgs[#msgs + 1] = h .. MSG
          end
        end
        local res = pyverify(msgs, dns(list))
        for i = 1, #msgs do assert.same({ true }, res[i], msgs[i]) end
        -- and Moonpost's own verifier agrees
        for i = 1, #msgs do
          local r = dkim.verify(msgs[i], dns(list))
          assert.equal("pass", r[1].result, msgs[i])
        end
      end)
    end

    it("writes one field per spec, in spec order, folded to lines of at most 78 characters", function()
      local k = keys()
      signer = dkim.signer()
      local h = assert(sign(signer, MSG, {
        { key = k.rsa4096, domain = "customer.example", selector = "s2024" },
        { key = k.ed25519, domain = "esp.example.net", selector = "ed1", identity = "bounces@mail.esp.example.net" },
        { key = k.rsa2048, domain = "esp.example.net", selector = "rsa1", canon = "simple/simple" },
      }))
      local fields = split_fields(h)
      assert.equal(3, #fields)
      assert.matches("d=customer.example; s=s2024;", fields[1]:gsub("\r\n\t", " "), 1, true)
      assert.matches("a=ed25519-sha256;", fields[2], 1, true)
      assert.matches("i=bounces@mail.esp.example.net;", fields[2]:gsub("\r\n\t", " "), 1, true)
      assert.matches("c=simple/simple; d=esp.example.net; s=rsa1;", fields[3]:gsub("\r\n\t", " "), 1, true)
      assert.equal("\r\n", h:sub(-2))
      for line in h:gmatch("([^\n]*)\n") do
        assert.is_true(#line - 1 <= 78, line)
        assert.equal("\r", line:sub(-1))
      end
      local list = { { "s2024", "customer.example", k.rsa4096 }, { "ed1", "esp.example.net", k.ed25519 },
        { "rsa1", "esp.example.net", k.rsa2048 } }
      assert.same({ { true, true, true } }, pyverify({ h .. MSG }, dns(list)))
      local r = dkim.verify(h .. MSG, dns(list))
      assert.same({ "pass", "pass", "pass" }, { r[1].result, r[2].result, r[3].result })
    end)

    it("signs two domains (the customer's and the ESP's), each verified on its own", function()
      local k = keys()
      signer = dkim.signer()
      local h = assert(sign(signer, MSG, {
        { key = k.ed25519, domain = "football.example.com", selector = "brisbane" },
        { key = k.rsa2048, domain = "esp.example", selector = "s1" },
      }))
      local signed = h .. MSG
      -- only the ESP's key published: the customer's signature cannot pass
      local only_esp = dns({ { "s1", "esp.example", k.rsa2048 } })
      assert.same({ { false, true } }, pyverify({ signed }, only_esp))
      local both = dns({ { "brisbane", "football.example.com", k.ed25519 }, { "s1", "esp.example", k.rsa2048 } })
      assert.same({ { true, true } }, pyverify({ signed }, both))
      -- the customer's key swapped for another one: that signature fails, the ESP's passes
      local wrong = dns({ { "brisbane", "football.example.com", k.ed25519b }, { "s1", "esp.example", k.rsa2048 } })
      assert.same({ { false, true } }, pyverify({ signed }, wrong))
      local r = dkim.verify(signed, wrong)
      assert.same({ "fail", "pass" }, { r[1].result, r[2].result })
    end)

    it("signs only the listed fields that are present, and oversigns From by default", function()
      local k = keys()
      signer = dkim.signer()
      for _, engine in ipairs({ "libopendkim", "openssl" }) do
        local s = dkim.signer { rsa = engine }
        local t = tags(assert(sign(s, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "s" } })))
        assert.equal("From:To:Subject:Date:Message-ID:from", t.h)
        t = tags(assert(sign(s, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "s",
          headers = { "from", "x-folded", "cc" }, oversign = {} } })))
        assert.equal("From:X-Folded", t.h)
        t = tags(assert(sign(s, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "s",
          headers = { "From" }, oversign = { "from", "subject", "reply-to" } } })))
        assert.equal("From:Subject:from:subject:reply-to", t.h)
        s:close()
      end
    end)

    it("a body changed after signing fails verification", function()
      local k = keys()
      signer = dkim.signer()
      local list = dns({ { "r", "football.example.com", k.rsa2048 }, { "e", "football.example.com", k.ed25519 } })
      local msgs = {}
      for _, c in ipairs({ "relaxed/relaxed", "simple/simple" }) do
        local h = assert(sign(signer, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "r",
          canon = c }, { key = k.ed25519, domain = "football.example.com", selector = "e", canon = c } }))
        msgs[#msgs + 1] = h .. MSG
        msgs[#msgs + 1] = h .. MSG:gsub("hungry", "angry")
      end
      assert.same({ { true, true }, { false, false }, { true, true }, { false, false } }, pyverify(msgs, list))
      local r = dkim.verify(msgs[2], list)
      assert.same({ "fail", "body hash did not verify" }, { r[1].result, r[1].reason })
      assert.same({ "fail", "body hash did not verify" }, { r[2].result, r[2].reason })
    end)

    it("a From added after signing fails (From is oversigned); without oversigning, the verifier refuses it", function()
      local k = keys()
      signer = dkim.signer()
      local list = dns({ { "r", "football.example.com", k.rsa2048 }, { "e", "football.example.com", k.ed25519 } })
      local over = assert(sign(signer, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "r" },
        { key = k.ed25519, domain = "football.example.com", selector = "e" } }))
      local plain = assert(sign(signer, MSG, {
        { key = k.rsa2048, domain = "football.example.com", selector = "r", oversign = {} },
        { key = k.ed25519, domain = "football.example.com", selector = "e", oversign = {} } }))
      local evil = "From: Mallory <mallory@evil.example>\r\n"
      local res = pyverify({ over .. MSG, over .. evil .. MSG }, list)
      assert.same({ { true, true }, { false, false } }, res)
      local r = dkim.verify(over .. evil .. MSG, list)
      assert.same({ "fail", "signature did not verify" }, { r[1].result, r[1].reason })
      assert.same({ "fail", "fail" }, { r[1].result, r[2].result })
      -- RFC 6376 5.4.2 takes the lowest From, so the signature alone does
      -- not notice the added one; the verifier counts them (RFC 6376 8.15,
      -- as python3-dkim does): a From that h= does not cover is a permerror
      r = dkim.verify(plain .. evil .. MSG, list)
      assert.same({ "permerror", "permerror" }, { r[1].result, r[2].result })
      assert.equal("2 From fields, 1 signed (h= must list From as often)", r[1].reason)
      assert.same({ { false, false } }, pyverify({ plain .. evil .. MSG }, list))
    end)

    it("signs a message userdata as it signs the same string", function()
      local k = keys()
      signer = dkim.signer()
      for _, kn in ipairs({ "rsa2048", "ed25519" }) do
        local spec = { { key = k[kn], domain = "football.example.com", selector = "s" } }
        local m = smtp.message(MSG)
        local a = assert(sign(signer, m, spec))
        m:close()
        local b = assert(sign(signer, MSG, spec))
        local ta, tb = tags(a), tags(b)
        assert.equal(ta.bh, tb.bh)
        assert.equal(ta.h, tb.h)
        if ta.t == tb.t then assert.equal(a, b) end -- both algorithms are deterministic
        local list = dns({ { "s", "football.example.com", k[kn] } })
        assert.same({ { true }, { true } }, pyverify({ a .. MSG, b .. MSG }, list))
      end
    end)

    it("copies the message: the caller may change or free it while the job runs", function()
      local k = keys()
      signer = dkim.signer { threads = 1 }
      local m = smtp.message(MSG)
      -- a slow job first, so that the second one waits in the queue
      assert(signer:submit(MSG, { { key = k.rsa4096, domain = "football.example.com", selector = "s" } }))
      local id = assert(signer:submit(m, { { key = k.ed25519, domain = "football.example.com", selector = "e" } }))
      m:append("tampered\r\n")
      m:close()
      m = nil -- luacheck: ignore 311 (dropped for the GC)
      collectgarbage()
      local got
      for _ = 1, 2000 do
        for _, r in ipairs(signer:collect()) do
          if r[1] == id then got = r[2] end
        end
        if got then break end
        uv.sleep(2)
      end
      local list = dns({ { "e", "football.example.com", k.ed25519 } })
      assert.same({ { true } }, pyverify({ got .. MSG }, list))
    end)

    it("honours identity, expire and timestamp = false", function()
      local k = keys()
      for _, engine in ipairs({ "libopendkim", "openssl" }) do
        local s = dkim.signer { rsa = engine }
        local h = assert(sign(s, MSG, {
          { key = k.rsa2048, domain = "football.example.com", selector = "r", identity = "@news.football.example.com",
            expire = 86400 },
          { key = k.ed25519, domain = "football.example.com", selector = "e", identity = "joe@football.example.com" },
          { key = k.rsa2048, domain = "football.example.com", selector = "r", timestamp = false },
        }))
        s:close()
        local fields = {}
        for i, f in ipairs(split_fields(h)) do fields[i] = tags(f) end
        assert.equal("@news.football.example.com", fields[1].i)
        assert.equal(86400, tonumber(fields[1].x) - tonumber(fields[1].t))
        assert.equal("joe@football.example.com", fields[2].i)
        assert.is_nil(fields[2].x)
        assert.is_nil(fields[3].t)
        local list = dns({ { "r", "football.example.com", k.rsa2048 }, { "e", "football.example.com", k.ed25519 } })
        assert.same({ { true, true, true } }, pyverify({ h .. MSG }, list))
      end
    end)

    it("signs a message without a body and one without a final CRLF as they go on the wire", function()
      local k = keys()
      signer = dkim.signer()
      local list = dns({ { "r", "example.com", k.rsa2048 }, { "e", "example.com", k.ed25519 } })
      local cases = { "From: a@example.com\r\nSubject: x\r\n\r\n", "From: a@example.com\r\n\r\nno final CRLF" }
      local msgs = {}
      for _, m in ipairs(cases) do
        for _, c in ipairs({ "simple/simple", "relaxed/relaxed" }) do
          local h = assert(sign(signer, m, { { key = k.rsa2048, domain = "example.com", selector = "r", canon = c },
            { key = k.ed25519, domain = "example.com", selector = "e", canon = c } }))
          msgs[#msgs + 1] = h .. m .. (m:sub(-2) == "\r\n" and "" or "\r\n")
        end
      end
      for _, r in ipairs(pyverify(msgs, list)) do assert.same({ true, true }, r) end
    end)

    it("signs a bare CR or LF as the CRLF the wire gives it (a message made in Lua, not received)", function()
      local k = keys()
      signer = dkim.signer()
      local other = dkim.signer { rsa = "libopendkim" }
      local list = dns({ { "r", "example.com", k.rsa2048 }, { "e", "example.com", k.ed25519 } })
      local cases = { "From: a@example.com\nSubject: LF only\n\nline one\nline  two \n\n\n",
        "From: a@example.com\r\nSubject: x\r\n\r\nbody\nwith a bare LF\r\nand a bare\rCR\r\r\n",
        "From: a@example.com\r\nSubject: x\r\n\r\na\rb\r\nends in a bare CR\r",
        "From: a@example.com\r\nSubject: x\r\n\r\nends in a bare LF\n" }
      local msgs = {}
      for _, m in ipairs(cases) do
        -- what Moonpost's client sends: dot-stuffed, every line ending CRLF
        local wire = assert(smtp.dotstuff(m)):sub(1, -4)
        assert.is_nil(wire:find("\r[^\n]") or wire:find("[^\r]\n"))
        for _, c in ipairs({ "simple/simple", "relaxed/relaxed" }) do
          local specs = { { key = k.rsa2048, domain = "example.com", selector = "r", canon = c, timestamp = false },
            { key = k.ed25519, domain = "example.com", selector = "e", canon = c } }
          local h = assert(sign(signer, m, specs))
          msgs[#msgs + 1] = h .. wire
          -- the raw bytes and their wire form are one message to sign
          local hw = assert(sign(signer, wire, specs))
          assert.equal(tags(h).bh, tags(hw).bh)
          -- libopendkim, given the wire form, signs the same RSA signature
          local specs1 = { specs[1] }
          assert.equal(assert(sign(other, wire, specs1)), assert(sign(signer, m, specs1)))
        end
      end
      other:close()
      for i, r in ipairs(pyverify(msgs, list)) do assert.same({ true, true }, r, msgs[i]) end
    end)

    it("reports a message without From as the job's error", function()
      local k = keys()
      signer = dkim.signer()
      for _, kn in ipairs({ "rsa2048", "ed25519" }) do
        local h, err = sign(signer, "Subject: x\r\n\r\nbody\r\n", { { key = k[kn], domain = "example.com", selector = "s" } })
        assert.is_nil(h)
        assert.matches("^example.com/s: ", err)
      end
    end)

    it("runs 2000 concurrent jobs from several threads; every job completes once and a sample verifies", function()
      local k = keys()
      signer = dkim.signer { threads = 4 }
      local ids, n = {}, 2000
      for i = 1, n do
        local kn = i % 2 == 0 and "rsa1024" or "ed25519"
        local msg = MSG:gsub("Hi%.", "Hi " .. i .. ".")
        local id = assert(signer:submit(msg, { { key = k[kn], domain = "football.example.com", selector = kn } }))
        assert.is_nil(ids[id])
        ids[id] = msg
      end
      assert.is_true(signer:pending() > 0)
      local got, sample, count = {}, {}, 0
      local deadline = os.time() + 120
      while count < n and os.time() < deadline do
        for _, r in ipairs(signer:collect()) do
          assert.is_nil(got[r[1]], "job collected twice")
          assert.is_string(r[2], r[3])
          got[r[1]] = true
          count = count + 1
          if count % 100 == 0 then sample[#sample + 1] = r[2] .. ids[r[1]] end
        end
        uv.sleep(1)
      end
      assert.equal(n, count)
      assert.equal(0, signer:pending())
      assert.same({}, signer:collect())
      local list = dns({ { "rsa1024", "football.example.com", k.rsa1024 }, { "ed25519", "football.example.com", k.ed25519 } })
      for _, r in ipairs(pyverify(sample, list)) do assert.same({ true }, r) end
    end)

    it("fd() becomes readable when a job finishes, and collect() drains it", function()
      local k = keys()
      signer = dkim.signer { threads = 1 }
      local fd = signer:fd()
      assert.is_number(fd)
      local ready = false
      local poll = uv.new_poll(fd)
      poll:start("r", function() ready = true poll:stop() end)
      assert(signer:submit(MSG, { { key = k.ed25519, domain = "example.com", selector = "s" } }))
      for _ = 1, 200 do
        uv.run("once")
        if ready then break end
      end
      assert.is_true(ready)
      assert.equal(1, #signer:collect())
      -- drained: the poll does not fire again
      ready = false
      poll:start("r", function() ready = true poll:stop() end)
      uv.run("nowait")
      assert.is_false(ready)
      poll:close()
      uv.run("nowait")
    end)

    it("raises on a bad spec and on a closed signer; close() is idempotent", function()
      local k = keys()
      signer = dkim.signer()
      local function bad(specs, pattern)
        local ok, err = pcall(signer.submit, signer, MSG, specs)
        assert.is_false(ok)
        assert.matches(pattern, err, 1, true)
      end
      local base = { key = k.rsa2048, domain = "example.com", selector = "s1" }
      local function with(t)
        local s = {}
        for kk, v in pairs(base) do s[kk] = v end
        for kk, v in pairs(t) do s[kk] = v end
        return { s }
      end
      bad({}, "expected 1 to 8 signature specs")
      bad({ "x" }, "spec 1: expected a table")
      bad(with { key = "k" }, "spec 1: key: expected a key")
      bad(with { domain = "bad domain" }, "spec 1: domain: expected a domain name")
      bad(with { selector = "s;1" }, "spec 1: selector: expected a selector")
      bad(with { canon = "relaxed" }, "spec 1: canon: expected")
      bad(with { headers = { "to", "subject" } }, "spec 1: headers: must include From")
      bad(with { headers = { "from", "x:y" } }, "spec 1: headers: expected header field names")
      bad(with { oversign = "from" }, "spec 1: oversign: expected a list")
      bad(with { identity = "joe@other.example" }, "spec 1: identity: expected [local]@domain within domain example.com")
      bad(with { expire = 1.5 }, "spec 1: expire: expected a whole number")
      bad(with { timestamp = "no" }, "spec 1: timestamp: expected a boolean")
      bad(with { selectr = "x" }, "spec 1: unknown field 'selectr'")
      assert.has_error(function() signer:submit(42, with {}) end)
      assert.has_error(function() dkim.signer { threads = 0 } end)
      assert.has_error(function() dkim.signer { rsa = "gnutls" } end)
      local m = smtp.message(MSG)
      m:close()
      assert.has_error(function() signer:submit(m, with {}) end)
      assert.is_true(signer:close())
      assert.is_true(signer:close())
      assert.has_error(function() signer:submit(MSG, with {}) end)
      assert.has_error(function() signer:collect() end)
      signer = nil
      -- a signer with queued jobs is closed by the GC
      local s = dkim.signer { threads = 1 }
      for _ = 1, 5 do s:submit(MSG, with { key = k.rsa4096 }) end
      s = nil -- luacheck: ignore 311 (dropped for the GC)
      collectgarbage()
      collectgarbage()
    end)
  end)

  describe("verification", function()
    it("signatures() lists each DKIM-Signature with its key query, malformed ones with an error", function()
      local msg = H.read(FIX .. "rfc8463.eml")
      local sigs = dkim.signatures(msg)
      assert.same({
        { domain = "football.example.com", selector = "brisbane", algorithm = "ed25519-sha256",
          query = "brisbane._domainkey.football.example.com", header_b = "/gCrinpc" },
        { domain = "football.example.com", selector = "test", algorithm = "rsa-sha256",
          query = "test._domainkey.football.example.com", header_b = "F45dVWDf" },
      }, sigs)
      local bad = "DKIM-Signature: v=1; a=rsa-sha256; d=Example.COM; s=S1; h=from; bh=x\r\n" ..
        "DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; h=to:subject; bh=x; b=y\r\n" ..
        "DKIM-Signature: garbage\r\n" .. MSG
      sigs = dkim.signatures(bad)
      assert.equal(3, #sigs)
      assert.same({ "Example.COM", "S1", "s1._domainkey.example.com", "missing b= tag" },
        { sigs[1].domain, sigs[1].selector, sigs[1].query, sigs[1].error })
      assert.equal("h= does not include From", sigs[2].error)
      assert.equal("tag without '='", sigs[3].error)
      assert.same({}, dkim.signatures(MSG))
    end)

    it("hands libopendkim no signature it finds malformed: duplicate tags made dkim_eoh write past a heap block "
      .. "(valgrind)", function()
      local input = H.root .. "/core/fuzz/regress/dkim_parse/dup-tags-eoh-overflow"
      local r = dkim.verify(H.read(input), {})
      assert.same({ "permerror", "duplicate tag" }, { r[1].result, r[1].reason })
      -- the verifier as the fuzz target drives it, without sanitizers, under
      -- valgrind: libopendkim is not instrumented, so only valgrind sees it
      local bin = tmp .. "/replay"
      H.run(function()
        local code, _, err = H.exec("cc", { "-g", "-I" .. H.root .. "/core", "-o", bin,
          H.root .. "/core/fuzz/fuzz_dkim_parse.c", H.root .. "/core/dkim.c", H.root .. "/core/workq.c",
          H.root .. "/core/fuzz/replay.c", "-lopendkim", "-lsodium", "-lcrypto", "-lpthread" }, { timeout = 120 })
        assert.equal(0, code, err)
        local out
        code, out, err = H.exec("valgrind", { "-q", "--error-exitcode=99", bin, input }, { timeout = 120 })
        assert.equal(0, code, (out or "") .. (err or ""))
      end, 300)
    end)

    it("does not hand a header with a NUL octet to libopendkim (its dkim_eoh overran a buffer)", function()
      -- the fuzz finding core/fuzz/regress/dkim_parse/nul-in-header-eoh-overflow
      local msg = H.read(H.root .. "/core/fuzz/regress/dkim_parse/nul-in-header-eoh-overflow")
      local r = dkim.verify(msg, {})
      assert.truthy(#r >= 1)
      for _, x in ipairs(r) do
        assert.equal("permerror", x.result)
      end
      local rfc = H.read(FIX .. "rfc8463.eml")
      local with_nul = rfc:gsub("\r\nSubject: ", "\r\nSubject: \0", 1)
      r = dkim.verify(with_nul, {})
      assert.equal(2, #r)
      assert.same({ "permerror", "header contains a NUL octet" }, { r[1].result, r[1].reason })
      -- and the libopendkim signer refuses such a message instead of reading past it
      local s = dkim.signer { rsa = "libopendkim" }
      local rsa = assert(dkim.load_key(FIX .. "rsa2048.pem"))
      local id = assert(s:submit("From: a@b.example\r\nSubject: x\0y\r\n\r\nbody\r\n",
        { { key = rsa, domain = "b.example", selector = "s1" } }))
      local out
      for _ = 1, 500 do
        out = s:collect()[1]
        if out then break end
        require("luv").sleep(10)
      end
      s:close()
      assert.equal(id, out[1])
      assert.is_nil(out[2])
      assert.truthy(tostring(out[3]):find("NUL", 1, true))
    end)

    it("the RFC 8463 Appendix A example verifies (Ed25519 and RSA), as python3-dkim agrees", function()
      local msg = H.read(FIX .. "rfc8463.eml")
      local keytable = {}
      for line in io.lines(FIX .. "rfc8463.keys") do
        local q, txt = line:match("^(%S+) (.*)$")
        keytable[q] = txt
      end
      local r = dkim.verify(msg, keytable)
      assert.same({ "pass", "pass" }, { r[1].result, r[2].result })
      assert.same({ "ed25519-sha256", "rsa-sha256" }, { r[1].algorithm, r[2].algorithm })
      assert.same({ { true, true } }, pyverify({ msg }, keytable))
      -- the example as usually reproduced, with a blank line after "Joe.", verifies too
      assert.same({ "pass", "pass" }, (function()
        local x = dkim.verify(msg .. "\r\n", keytable)
        return { x[1].result, x[2].result }
      end)())
      -- tampered: a changed body fails both; a changed signed field fails both
      r = dkim.verify(msg:gsub("hungry", "angry"), keytable)
      assert.same({ "fail", "fail" }, { r[1].result, r[2].result })
      r = dkim.verify(msg:gsub("dinner", "lunch"), keytable)
      assert.same({ "signature did not verify", "signature did not verify" }, { r[1].reason, r[2].reason })
      -- the keys swapped between the selectors: neither verifies
      r = dkim.verify(msg, { ["brisbane._domainkey.football.example.com"] = keytable["test._domainkey.football.example.com"],
        ["test._domainkey.football.example.com"] = keytable["brisbane._domainkey.football.example.com"] })
      assert.is_true(r[1].result ~= "pass" and r[2].result ~= "pass")
    end)

    it("verify() passes python-signed messages (RSA and Ed25519, simple and relaxed)", function()
      local k = keys()
      H.write(tmp .. "/msg.eml", MSG)
      local list = dns({ { "r", "football.example.com", k.rsa2048 }, { "e", "football.example.com", k.ed25519 } })
      for _, c in ipairs({ "relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed" }) do
        local rs = pysign(tmp .. "/msg.eml", FIX .. "rsa2048.pem", "football.example.com", "r", c, "rsa-sha256")
        local es = pysign(tmp .. "/msg.eml", FIX .. "ed25519.pem", "football.example.com", "e", c, "ed25519-sha256")
        local r = dkim.verify(es .. rs .. MSG, list)
        assert.same({ "pass", "pass" }, { r[1].result, r[2].result }, c)
        assert.same({ "e", "r" }, { r[1].selector, r[2].selector })
        r = dkim.verify(es .. rs .. MSG:gsub("Joe%.", "Jim."), list)
        assert.same({ "fail", "fail" }, { r[1].result, r[2].result }, c)
      end
    end)

    it("verify() says how much of a body passed with l= was not signed (content appended after signing)", function()
      local k = keys()
      H.write(tmp .. "/msg.eml", MSG)
      local list = dns({ { "r", "football.example.com", k.rsa2048 } })
      local sig = pysign(tmp .. "/msg.eml", FIX .. "rsa2048.pem", "football.example.com", "r", "relaxed/simple",
        "rsa-sha256", true)
      assert.truthy(sig:find("l=", 1, true), sig)
      local r = dkim.verify(sig .. MSG, list)[1]
      assert.equal("pass", r.result)
      assert.is_nil(r.body_unsigned)
      -- a line appended after signing: still a pass (RFC 6376 8.2), and said
      local extra = "Click here: http://bad.example/\r\n"
      r = dkim.verify(sig .. MSG .. extra, list)[1]
      assert.equal("pass", r.result)
      -- (MSG ends with an empty line, which the canonical body leaves out
      -- until text follows it: that CRLF is unsigned too)
      assert.equal(#extra + 2, r.body_unsigned)
      -- python3-dkim agrees that it verifies
      assert.same({ { true } }, pyverify({ sig .. MSG .. extra }, { ["r._domainkey.football.example.com"] = k.rsa2048:txt() }))
    end)

    it("verify() judges b= or bh= that is not base64, and a bad l=, malformed (permerror), not failed", function()
      local k = keys()
      signer = dkim.signer()
      local h = assert(sign(signer, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "r" } }))
      local list = { ["r._domainkey.football.example.com"] = k.rsa2048:txt() }
      assert.equal("pass", dkim.verify(h .. MSG, list)[1].result)
      local b = h:match("b=([^;]+)$"):gsub("%s", "")
      local bh = h:match("bh=([^;]+);")
      local cases = {
        { h:gsub("b=[^;]+$", "b=" .. b:sub(1, 40) .. "!" .. b:sub(42) .. "\r\n"), "b= is not base64" },
        { h:gsub("b=[^;]+$", "b=" .. b:sub(1, -6) .. "\r\n"), "b= is not base64" },
        { h:gsub("b=[^;]+$", "b=" .. b .. "===" .. "\r\n"), "b= is not base64" },
        { h:gsub("bh=[^;]+;", "bh=" .. bh:sub(1, 10) .. "*" .. bh:sub(12) .. ";"), "bh= is not base64" },
        { h:gsub("bh=", "l=12x; bh="), "bad l= value" },
        { h:gsub("bh=", "l=; bh="), "bad l= value" },
      }
      for _, c in ipairs(cases) do
        local r = dkim.verify(c[1] .. MSG, list)[1]
        assert.same({ "permerror", c[2] }, { r.result, r.reason }, c[1])
      end
      -- folding white space inside b= is allowed
      local folded = h:gsub("b=([^;]+)$", function(v)
        local s = v:gsub("%s", "")
        return "b=" .. s:sub(1, 30) .. "\r\n\t " .. s:sub(31) .. "\r\n"
      end)
      assert.equal("pass", dkim.verify(folded .. MSG, list)[1].result)
    end)

    it("verify() passes a signature whose h= covers a DKIM-Signature field that is itself malformed "
      .. "(RFC 6376 5.4: a field like any other)", function()
      local k = keys()
      local list = dns({ { "r", "football.example.com", k.rsa2048 } })
      -- malformed in Moonpost's eyes, each its own way, but a clean tag list:
      -- h= without From, a v= to come, a b= that is not base64
      local inner = {
        { "DKIM-Signature: v=1; a=rsa-sha256; d=list.example; s=x; h=to:subject;\r\n\tbh=YWJjZA==; b=YWJjZA==\r\n",
          "h= does not include From" },
        { "DKIM-Signature: v=2; a=rsa-sha256; d=list.example; s=x; h=from;\r\n\tbh=YWJjZA==; b=YWJjZA==\r\n",
          "v= is not 1" },
        { "DKIM-Signature: v=1; a=rsa-sha256; d=list.example; s=x; h=from;\r\n\tbh=YWJjZA==; b=YWJj!A==\r\n",
          "b= is not base64" },
      }
      for _, c in ipairs(inner) do
        H.write(tmp .. "/msg.eml", c[1] .. MSG)
        for _, canon in ipairs({ "relaxed/relaxed", "simple/simple" }) do
          local outer = pysign(tmp .. "/msg.eml", FIX .. "rsa2048.pem", "football.example.com", "r", canon,
            "rsa-sha256", false, true)
          assert.truthy(tags(outer).h:lower():find("dkim-signature", 1, true), outer)
          local m = outer .. c[1] .. MSG
          -- python3-dkim agrees that the outer one verifies
          assert.same({ true, false }, pyverify({ m }, dns({ { "r", "football.example.com", k.rsa2048 } }))[1])
          local r = dkim.verify(m, list)
          assert.same({ "pass", "permerror", c[2] }, { r[1].result, r[2].result, r[2].reason }, canon .. " " .. c[2])
        end
      end
    end)

    it("verify() judges a signature's own errors permerror even when its key lookup failed", function()
      local bh = "bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=dGhpcyBpcyBub3QgYSBzaWduYXR1cmU="
      local now = os.time()
      local cases = {
        { "t=1000; x=2000", "signature expired" },
        { "t=" .. (now + 86400 * 30), "signature timestamp in the future" },
        { "q=http/well-known", "q= names no query method Moonpost has (dns/txt)" },
      }
      for _, c in ipairs(cases) do
        local sig = "DKIM-Signature: v=1; a=rsa-sha256; d=football.example.com; s=r; c=relaxed/relaxed; h=from; "
          .. c[1] .. "; " .. bh .. "\r\n"
        -- {}: no answer for the key (a DNS timeout), false: no key
        for _, keyset in ipairs({ {}, { ["r._domainkey.football.example.com"] = false } }) do
          local r = dkim.verify(sig .. MSG, keyset)
          assert.equal("permerror", r[1].result, c[1] .. ": " .. tostring(r[1].reason))
          assert.equal(c[2], r[1].reason)
        end
      end
    end)

    it("verify() refuses a key whose k= does not fit the signature's a= (RFC 6376 6.1.2)", function()
      local k = keys()
      signer = dkim.signer()
      local h = assert(sign(signer, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "r" } }))
      local q = "r._domainkey.football.example.com"
      local txt = k.rsa2048:txt()
      assert.truthy(txt:find("k=rsa", 1, true))
      assert.equal("pass", dkim.verify(h .. MSG, { [q] = txt })[1].result)
      local r = dkim.verify(h .. MSG, { [q] = (txt:gsub("k=rsa", "k=ed25519")) })[1]
      assert.equal("permerror", r.result)
      assert.equal("key type k=ed25519 does not fit a=rsa-sha256", r.reason)
      -- no k= is k=rsa
      assert.equal("pass", dkim.verify(h .. MSG, { [q] = (txt:gsub("k=rsa; ?", "")) })[1].result)
      -- and an Ed25519 key under k=rsa (or no k=) does not verify an Ed25519 signature
      local he = assert(sign(signer, MSG, { { key = k.ed25519, domain = "football.example.com", selector = "r" } }))
      local etxt = k.ed25519:txt()
      assert.equal("pass", dkim.verify(he .. MSG, { [q] = etxt })[1].result)
      assert.are_not.equal("pass", dkim.verify(he .. MSG, { [q] = (etxt:gsub("k=ed25519", "k=rsa")) })[1].result)
    end)

    it("verify() reports permerror, temperror and policy with a reason", function()
      local k = keys()
      signer = dkim.signer()
      local h = assert(sign(signer, MSG, { { key = k.rsa2048, domain = "football.example.com", selector = "r" } }))
      local signed = h .. MSG
      local q = "r._domainkey.football.example.com"
      -- no key in the table: a temporary DNS failure
      local r = dkim.verify(signed, {})
      assert.same({ "temperror", "no answer for the key (r._domainkey.football.example.com)" }, { r[1].result, r[1].reason })
      assert.equal("temperror", dkim.verify(signed)[1].result)
      -- false: no record
      r = dkim.verify(signed, { [q] = false })
      assert.same({ "permerror", "no key for signature (r._domainkey.football.example.com)" }, { r[1].result, r[1].reason })
      -- a revoked key (empty p=) and a broken record
      assert.equal("permerror", dkim.verify(signed, { [q] = "v=DKIM1; k=rsa; p=" })[1].result)
      assert.equal("permerror", dkim.verify(signed, { [q] = "v=DKIM1; k=rsa; p=!!!" })[1].result)
      -- a record longer than libopendkim takes
      r = dkim.verify(signed, { [q] = k.rsa2048:txt() .. "; n=" .. string.rep("x", 1100) })
      assert.same({ "permerror", "key record longer than 1024 bytes" }, { r[1].result, r[1].reason })
      -- a malformed signature
      r = dkim.verify("DKIM-Signature: v=1; a=rsa-sha256; d=football.example.com; s=r; h=from; bh=x\r\n" .. MSG,
        { [q] = k.rsa2048:txt() })
      assert.same({ "permerror", "missing b= tag" }, { r[1].result, r[1].reason })
      assert.equal("football.example.com", r[1].domain)
      -- the other signature of the message is unaffected
      r = dkim.verify("DKIM-Signature: v=1; d=x.example; s=s\r\n" .. signed, { [q] = k.rsa2048:txt() })
      assert.same({ "permerror", "pass" }, { r[1].result, r[2].result })
      -- a key in testing mode is reported
      r = dkim.verify(signed, { [q] = k.rsa2048:txt() .. "; t=y" })
      assert.same({ "pass", true }, { r[1].result, r[1].testing })
      -- more signatures than are verified: the rest get "policy"
      local many = {}
      for i = 1, 20 do many[i] = h end
      r = dkim.verify(table.concat(many) .. MSG, { [q] = k.rsa2048:txt() })
      assert.equal(20, #r)
      assert.same({ "pass", "policy" }, { r[1].result, r[20].result })
      -- bad arguments
      assert.has_error(function() dkim.verify(signed, { [q] = true }) end)
      assert.has_error(function() dkim.verify(signed, { 42 }) end)
      assert.has_error(function() dkim.verify({}, {}) end)
      assert.same({}, dkim.verify(MSG, {}))
    end)
  end)
end)

describe("moonpost.runtime.dkim", function()
  local rdkim = require "moonpost.runtime.dkim"
  local sched = require "moonpost.runtime.sched"
  before_each(function() tmp = H.tmpdir("moonpost-rdkim") end)
  after_each(function()
    rdkim.shutdown()
    H.rm_rf(tmp)
  end)

  it("verify() looks up the keys of the signatures it verifies only, not of those past the limit", function()
    local msg = "From: a@x.example\r\nSubject: s\r\n\r\nbody\r\n"
    local sigs = {}
    for i = 1, 40 do
      sigs[i] = string.format("DKIM-Signature: v=1; a=rsa-sha256; d=d%d.example; s=s; h=from; bh=AAAA; b=AAAA\r\n", i)
    end
    local asked = {}
    local r = H.run(function()
      return rdkim.verify(table.concat(sigs) .. msg, function(q)
        asked[#asked + 1] = q
        return nil
      end, 30)
    end)
    assert.equal(require("moonpost.core.dkim").MAX_SIGS, #asked)
    assert.equal("s._domainkey.d1.example", asked[1])
    assert.equal(40, #r)
    assert.equal("policy", r[40].result)
  end)

  it("sign() yields: a timer task keeps ticking while RSA-4096 signatures are made", function()
    local k = keys()
    local results = H.run(function()
      local ticks, done, out = 0, 0, {}
      local ticker = sched.spawn(function()
        while done < 4 do
          sched.sleep(0.005)
          ticks = ticks + 1
        end
      end)
      local before = ticks
      local t0 = uv.hrtime()
      for i = 1, 4 do
        sched.spawn(function()
          local specs = {}
          for j = 1, 4 do specs[j] = { key = k.rsa4096, domain = "football.example.com", selector = "s" .. j } end
          out[i] = { rdkim.sign(MSG, specs, 60) }
          done = done + 1
        end)
      end
      assert.is_true(rdkim.pending() > 0)
      H.wait_for(function() return done == 4 end, 60)
      local elapsed = (uv.hrtime() - t0) / 1e9
      H.wait_for(function() return ticker.done end, 5)
      return { ticks = ticks - before, elapsed = elapsed, out = out }
    end, 90)
    -- the ticker ran throughout (a 5 ms timer, roughly every 5-10 ms)
    assert.is_true(results.ticks >= results.elapsed * 1000 / 25, results.ticks .. " ticks in " .. results.elapsed .. " s")
    local msgs = {}
    for i = 1, 4 do
      assert.is_string(results.out[i][1], tostring(results.out[i][2]))
      msgs[i] = results.out[i][1] .. MSG
    end
    local list = dns({ { "s1", "football.example.com", k.rsa4096 }, { "s2", "football.example.com", k.rsa4096 },
      { "s3", "football.example.com", k.rsa4096 }, { "s4", "football.example.com", k.rsa4096 } })
    for _, r in ipairs(pyverify(msgs, list)) do assert.same({ true, true, true, true }, r) end
  end)

  it("sign() makes Ed25519 signatures of small messages at once, and sends large ones to the threads", function()
    local k = keys()
    H.run(function()
      local specs = { { key = k.ed25519, domain = "football.example.com", selector = "s1" } }
      -- small: no wait, nothing goes to the threads
      local other_ran = false
      sched.spawn(function() sched.sleep(0) other_ran = true end)
      local small = assert(rdkim.sign(MSG, specs))
      assert.is_false(other_ran)
      assert.equal(0, rdkim.pending())
      -- large (over INLINE_MAX): the task waits for a thread
      local big = MSG .. string.rep(string.rep("y", 998) .. "\r\n", math.ceil(rdkim.INLINE_MAX / 1000) + 1)
      local seen_pending = false
      sched.spawn(function()
        for _ = 1, 100 do
          if rdkim.pending() > 0 then seen_pending = true end
          sched.sleep(0)
        end
      end)
      local large = assert(rdkim.sign(big, specs))
      assert.is_true(seen_pending)
      -- configured off: small ones go to the threads too
      rdkim.shutdown()
      rdkim.configure({ inline_ed25519 = false })
      local yielded = false
      sched.spawn(function() sched.sleep(0) yielded = true end)
      local off = assert(rdkim.sign(MSG, specs))
      assert.is_true(yielded)
      rdkim.shutdown()
      rdkim.configure({})
      local list = dns({ { "s1", "football.example.com", k.ed25519 } })
      assert.same({ { true }, { true }, { true } }, pyverify({ small .. MSG, large .. big, off .. MSG }, list))
    end)
  end)

  it("sign() leaves no handle open when idle, times out, and reports job errors", function()
    local k = keys()
    H.run(function()
      local h = assert(rdkim.sign(smtp.message(MSG), { { key = k.ed25519, domain = "example.com", selector = "s" } }))
      assert.matches("^DKIM%-Signature: v=1; a=ed25519%-sha256;", h)
      assert.equal(0, rdkim.pending())
      local h2, err = rdkim.sign("Subject: no from\r\n\r\n", { { key = k.ed25519, domain = "example.com", selector = "s" } })
      assert.is_nil(h2)
      assert.matches("^dkim: example.com/s: message has no From field", err)
      -- a timeout: the job finishes later and its result is dropped. Four
      -- jobs of eight RSA-4096 signatures go first, so that the timed one
      -- finishes well after the scheduler's next tick (25 ms), which ends a
      -- 1 ms wait (the two signer threads take ~35 ms a job here)
      local specs = {}
      for j = 1, 8 do specs[j] = { key = k.rsa4096, domain = "example.com", selector = "s" } end
      local ahead = 0
      for _ = 1, 4 do
        sched.spawn(function()
          ahead = ahead + 1
          assert.is_string((rdkim.sign(MSG, specs)))
          ahead = ahead - 1
        end)
      end
      local h3, err3 = rdkim.sign(MSG, specs, 0.001)
      assert.same({ nil, "dkim: timeout" }, { h3, err3 })
      H.wait_for(function() return rdkim.pending() == 0 and ahead == 0 end, 30)
      sched.sleep(0.05)
      assert.has_error(function() rdkim.sign(MSG, { { key = k.ed25519, domain = "bad domain", selector = "s" } }) end,
        nil)
    end)
    -- outside a task
    assert.has_error(function() rdkim.sign(MSG, {}) end, "dkim.sign() outside a task")
  end)

  it("shutdown() wakes the waiting tasks with an error", function()
    local k = keys()
    H.run(function()
      local res
      sched.spawn(function()
        local specs = {}
        for j = 1, 8 do specs[j] = { key = k.rsa4096, domain = "example.com", selector = "s" } end
        res = { rdkim.sign(MSG, specs) }
      end)
      sched.sleep(0.01)
      rdkim.shutdown()
      H.wait_for(function() return res ~= nil end, 10)
      assert.same({ nil, "dkim: closed" }, res)
      -- and the next sign() starts a new signer
      assert.is_string((rdkim.sign(MSG, { { key = k.ed25519, domain = "example.com", selector = "s" } })))
    end)
  end)

  it("verify() looks the keys up once each, with a function that may wait", function()
    local k = keys()
    H.run(function()
      local h = assert(rdkim.sign(MSG, { { key = k.ed25519, domain = "football.example.com", selector = "e" },
        { key = k.rsa2048, domain = "football.example.com", selector = "r" },
        { key = k.rsa2048, domain = "football.example.com", selector = "r", canon = "simple/simple" } }))
      local asked = {}
      local published = { ["e._domainkey.football.example.com"] = k.ed25519:txt() }
      local r = assert(rdkim.verify(h .. MSG, function(q)
        asked[#asked + 1] = q
        sched.sleep(0.001)
        if q:match("^r%.") then return nil end -- a DNS timeout
        return published[q]
      end))
      assert.same({ "e._domainkey.football.example.com", "r._domainkey.football.example.com" }, asked)
      assert.same({ "pass", "temperror", "temperror" }, { r[1].result, r[2].result, r[3].result })
      published["r._domainkey.football.example.com"] = { "v=spf1 -all", k.rsa2048:txt() }
      r = assert(rdkim.verify(h .. MSG, function(q) return published[q] end))
      assert.same({ "pass", "pass", "pass" }, { r[1].result, r[2].result, r[3].result })
      r = assert(rdkim.verify(h .. MSG, function() return false end))
      assert.same({ "permerror", "permerror", "permerror" }, { r[1].result, r[2].result, r[3].result })
    end)
  end)
end)

describe("scripts/dkim-keygen", function()
  local function run(args)
    local p = assert(io.popen(H.root .. "/scripts/dkim-keygen " .. args .. " 2>" .. tmp .. "/stderr; echo \"rc=$?\""))
    local out = p:read("*a")
    p:close()
    local rc = tonumber(out:match("rc=(%d+)\n$"))
    return rc, out:gsub("rc=%d+\n$", ""), H.read(tmp .. "/stderr")
  end
  before_each(function() tmp = H.tmpdir("moonpost-keygen") end)
  after_each(function() H.rm_rf(tmp) end)

  it("writes <dir>/<domain>/<selector>.pem (0600) and prints the TXT record in 255-octet strings", function()
    for _, case in ipairs({ { "--bits 4096", "rsa", 4096 }, { "--type ed25519", "ed25519", 256 }, { "", "rsa", 2048 } }) do
      local sel = "s" .. case[3]
      local rc, out, err = run(case[1] .. " --domain Example.COM --selector " .. sel .. " --dir " .. tmp .. "/dkim")
      assert.equal(0, rc, err)
      local file = tmp .. "/dkim/example.com/" .. sel .. ".pem"
      assert.matches("wrote " .. file, err, 1, true)
      assert.equal(tonumber("600", 8), uv.fs_stat(file).mode % 512)
      local k = assert(dkim.load_key(file))
      assert.same({ case[2], case[3] }, { k:info().type, k:info().bits })
      local name, body = out:match("^(%S+) IN TXT %( (.-) %)\n$")
      assert.equal(sel .. "._domainkey.example.com.", name)
      local strings = {}
      for s in body:gmatch('"([^"]*)"') do
        assert.is_true(#s <= 255)
        strings[#strings + 1] = s
      end
      assert.equal("v=DKIM1; k=" .. case[2] .. "; ", strings[1])
      assert.equal(k:txt(), table.concat(strings))
      if H.have("nsd-checkzone") then
        H.write(tmp .. "/zone", "$TTL 300\n@ IN SOA ns.example.com. h.example.com. 1 3600 600 86400 300\n" ..
          "@ IN NS ns.example.com.\nns IN A 127.0.0.1\n" .. out)
        assert.equal(0, os.execute("nsd-checkzone example.com " .. tmp .. "/zone >/dev/null 2>&1"))
      end
    end
    assert.equal(tonumber("700", 8), uv.fs_stat(tmp .. "/dkim/example.com").mode % 512)
  end)

  it("refuses to replace a key, and explains bad arguments", function()
    local rc, _, err = run("--type ed25519 --domain example.com --selector s1 --dir " .. tmp)
    assert.equal(0, rc, err)
    local before = H.read(tmp .. "/example.com/s1.pem")
    rc, _, err = run("--domain example.com --selector s1 --dir " .. tmp)
    assert.equal(2, rc)
    assert.matches("s1.pem: already exists; not replacing it", err, 1, true)
    assert.equal(before, H.read(tmp .. "/example.com/s1.pem"))
    assert.same({ "s1.pem" }, H.ls(tmp .. "/example.com")) -- no temporary file left behind
    rc, _, err = run("--bits 512 --domain example.com --selector s2 --dir " .. tmp)
    assert.same({ 2, "dkim-keygen: --bits: expected 1024 to 4096\n" }, { rc, err })
    rc, _, err = run("--domain example.com --dir " .. tmp)
    assert.equal(2, rc)
    assert.matches("--selector is required", err, 1, true)
    rc, _, err = run("--domain 'bad domain' --selector s --dir " .. tmp)
    assert.same({ 2, "dkim-keygen: --domain: not a domain name: bad domain\n" }, { rc, err })
    -- an internationalized domain goes by its A-labels; an invalid one is refused
    local out
    rc, out, err = run("--type ed25519 --domain Bücher.example --selector s1 --dir " .. tmp)
    assert.equal(0, rc, err)
    assert.matches("^s1%._domainkey%.xn%-%-bcher%-kva%.example%. IN TXT", out)
    assert.same({ "s1.pem" }, H.ls(tmp .. "/xn--bcher-kva.example"))
    rc, _, err = run("--domain 'a\255.example' --selector s --dir " .. tmp)
    assert.equal(2, rc)
    assert.matches("not a valid internationalized domain name", err, 1, true)
    rc, _, err = run("--type dsa --domain example.com --selector s --dir " .. tmp)
    assert.same({ 2, "dkim-keygen: --type: expected rsa or ed25519\n" }, { rc, err })
    rc = run("--help")
    assert.equal(0, rc)
  end)

  it("refuses a selector or domain with a label over 63 octets (no DNS name, and the signer refuses it)", function()
    local long = string.rep("a", 64)
    local rc, _, err = run("--type ed25519 --domain example.com --selector " .. long .. " --dir " .. tmp)
    assert.equal(2, rc, err)
    assert.matches("--selector: not a selector", err, 1, true)
    rc, _, err = run("--type ed25519 --domain " .. long .. ".example --selector s9 --dir " .. tmp)
    assert.equal(2, rc, err)
    assert.matches("--domain: not a domain name", err, 1, true)
  end)
end)
