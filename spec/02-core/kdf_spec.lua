-- moonpost.core.kdf (PBKDF2-HMAC-SHA256 and scrypt through OpenSSL, the
-- worker pool) and moonpost.runtime.passwd (the hash formats). Every key
-- made here is checked against Python's hashlib (Debian's /usr/bin/python3)
-- for the same inputs.
local kdf = require "moonpost.core.kdf"
local passwd = require "moonpost.runtime.passwd"
local cjson = require "cjson"
local uv = require "luv"
local H = require "helpers"

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- Python computes the reference keys: a list of cases in, hex keys out.
local function python_keys(cases)
  local script = [[
import hashlib, json, sys
out = []
for c in json.load(sys.stdin):
    pw, salt = bytes.fromhex(c["pw"]), bytes.fromhex(c["salt"])
    if c["alg"] == "pbkdf2":
        k = hashlib.pbkdf2_hmac("sha256", pw, salt, c["iterations"], c["len"])
    else:
        k = hashlib.scrypt(pw, salt=salt, n=c["N"], r=c["r"], p=c["p"], maxmem=2**31 - 1, dklen=c["len"])
    out.append(k.hex())
print(json.dumps(out))
]]
  for _, c in ipairs(cases) do
    c.pw, c.salt = hex(c.password), hex(c.salt_raw)
  end
  local code, out, err = H.run(function()
    return H.exec(H.python, { "-c", script }, { stdin = cjson.encode(cases), timeout = 60 })
  end)
  assert.equal(0, code, err)
  return cjson.decode(out)
end

local CASES = {
  { alg = "pbkdf2", password = "password", salt_raw = "salt", iterations = 1, len = 32 },
  { alg = "pbkdf2", password = "correct horse battery staple", salt_raw = "0123456789abcdef", iterations = 1000, len = 32 },
  { alg = "pbkdf2", password = "", salt_raw = "\0\1\2\3\4\5\6\7", iterations = 2000, len = 64 },
  { alg = "pbkdf2", password = "pässwörd\0with nul", salt_raw = "\255\254\253salt-octets", iterations = 4096, len = 16 },
  { alg = "scrypt", password = "password", salt_raw = "NaCl", N = 1024, r = 8, p = 16, len = 64 },
  { alg = "scrypt", password = "pässwörd", salt_raw = "0123456789abcdef", N = 16384, r = 8, p = 1, len = 32 },
  { alg = "scrypt", password = "", salt_raw = "salt salt salt", N = 2, r = 1, p = 1, len = 20 },
}

describe("moonpost.core.kdf", function()
  it("pbkdf2_sha256() and scrypt() give the keys of Python's hashlib", function()
    local want = python_keys(CASES)
    for i, c in ipairs(CASES) do
      local got
      if c.alg == "pbkdf2" then
        got = assert(kdf.pbkdf2_sha256(c.password, c.salt_raw, c.iterations, c.len))
      else
        got = assert(kdf.scrypt(c.password, c.salt_raw, c.N, c.r, c.p, c.len))
      end
      assert.equal(c.len, #got)
      assert.equal(want[i], hex(got), "case " .. i)
    end
  end)

  it("matches the RFC 7914 test vectors", function()
    assert.equal("120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b",
      hex(kdf.pbkdf2_sha256("password", "salt", 1)))
    assert.equal("fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b3731622eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640",
      hex(kdf.scrypt("password", "NaCl", 1024, 8, 16, 64)))
  end)

  it("raises on parameters beyond the limits", function()
    assert.has_error(function() kdf.pbkdf2_sha256("pw", "salt", 0) end)
    assert.has_error(function() kdf.pbkdf2_sha256("pw", "salt", 1.5) end)
    assert.has_error(function() kdf.pbkdf2_sha256("pw", "salt", 1e9) end)
    assert.has_error(function() kdf.pbkdf2_sha256("pw", "salt", 1, 8) end)
    assert.has_error(function() kdf.pbkdf2_sha256("pw", "salt", 1, 65) end)
    assert.has_error(function() kdf.pbkdf2_sha256("pw", string.rep("s", 65), 1) end)
    assert.has_error(function() kdf.pbkdf2_sha256(string.rep("p", 1025), "salt", 1) end)
    assert.has_error(function() kdf.scrypt("pw", "salt", 1000, 8, 1) end)   -- not a power of 2
    assert.has_error(function() kdf.scrypt("pw", "salt", 1, 8, 1) end)
    assert.has_error(function() kdf.scrypt("pw", "salt", 2 ^ 24, 8, 1) end) -- 2 GiB
    assert.has_error(function() kdf.scrypt("pw", "salt", 1024, 0, 1) end)
  end)

  it("equal() compares whole strings", function()
    assert.is_true(kdf.equal("abc", "abc"))
    assert.is_false(kdf.equal("abc", "abd"))
    assert.is_false(kdf.equal("abc", "ab"))
    assert.is_true(kdf.equal("", ""))
  end)

  it("random() gives fresh octets", function()
    local a, b = kdf.random(16), kdf.random(16)
    assert.equal(16, #a)
    assert.are_not.equal(a, b)
    assert.has_error(function() kdf.random(0) end)
  end)

  describe("pool", function()
    local function wait_results(pool, n)
      local got = {}
      for _ = 1, 5000 do
        for _, r in ipairs(pool:collect()) do got[r[1]] = r end
        local c = 0
        for _ in pairs(got) do c = c + 1 end
        if c >= n then return got end
        uv.sleep(2)
      end
      error("the pool did not finish")
    end

    it("submit() verifies on its threads: true for the right password, false otherwise", function()
      local pool = assert(kdf.pool(2))
      local key = kdf.pbkdf2_sha256("secret", "0123456789abcdef", 1000)
      local skey = kdf.scrypt("secret", "0123456789abcdef", 1024, 8, 1)
      local a = assert(pool:submit(key, "pbkdf2-sha256", "secret", "0123456789abcdef", 1000))
      local b = assert(pool:submit(key, "pbkdf2-sha256", "Secret", "0123456789abcdef", 1000))
      local c = assert(pool:submit(skey, "scrypt", "secret", "0123456789abcdef", 1024, 8, 1))
      local d = assert(pool:submit(skey, "scrypt", "secret", "0123456789abcdeF", 1024, 8, 1))
      assert.is_number(pool:fd())
      local got = wait_results(pool, 4)
      assert.is_true(got[a][2])
      assert.is_false(got[b][2])
      assert.is_true(got[c][2])
      assert.is_false(got[d][2])
      assert.equal(0, pool:pending())
      assert.is_true(pool:close())
      assert.is_true(pool:close())
      assert.has_error(function() pool:fd() end)
      collectgarbage()
    end)

    it("says busy when too many jobs wait, and raises on misuse", function()
      local pool = assert(kdf.pool(1))
      local key = string.rep("k", 32)
      assert.has_error(function() pool:submit("short", "pbkdf2-sha256", "pw", "saltsalt", 1) end)
      assert.has_error(function() pool:submit(key, "md5", "pw", "saltsalt", 1) end)
      assert.has_error(function() pool:submit(key, "scrypt", "pw", "saltsalt", 3, 8, 1) end)
      local ok, busy = 0, nil
      for _ = 1, kdf.MAX_QUEUE + 5 do
        local id, err = pool:submit(key, "pbkdf2-sha256", "pw", "saltsalt", 1)
        if id then ok = ok + 1 else busy = err end
      end
      assert.equal(kdf.MAX_QUEUE, ok)
      assert.equal("busy", busy)
      pool:close()
    end)
  end)
end)

describe("moonpost.runtime.passwd", function()
  it("hash() makes strings that Python's hashlib recomputes", function()
    local s1 = assert(passwd.hash("hunter2", { scheme = "pbkdf2-sha256", iterations = 1000 }))
    local s2 = assert(passwd.hash("hunter2", { scheme = "scrypt", ln = 10, r = 8, p = 1 }))
    assert.truthy(s1:match("^%$pbkdf2%-sha256%$1000%$[%w+/]+%$[%w+/]+$"), s1)
    assert.truthy(s2:match("^%$scrypt%$ln=10,r=8,p=1%$[%w+/]+%$[%w+/]+$"), s2)
    local script = [[
import base64, hashlib, sys
def b64(s): return base64.b64decode(s + "=" * (-len(s) % 4))
for line in sys.argv[2:]:
    _, scheme, params, salt, key = line.split("$")
    if scheme == "pbkdf2-sha256":
        k = hashlib.pbkdf2_hmac("sha256", sys.argv[1].encode(), b64(salt), int(params), len(b64(key)))
    else:
        p = dict(x.split("=") for x in params.split(","))
        k = hashlib.scrypt(sys.argv[1].encode(), salt=b64(salt), n=2 ** int(p["ln"]), r=int(p["r"]), p=int(p["p"]),
                           dklen=len(b64(key)))
    print("ok" if k == b64(key) else "mismatch")
]]
    local code, out, err = H.run(function() return H.exec(H.python, { "-c", script, "hunter2", s1, s2 }) end)
    assert.equal(0, code, err)
    assert.equal("ok\nok\n", out)
  end)

  it("parse() reads Python-made hashes, with or without base64 padding", function()
    local script = [[
import base64, hashlib
salt = b"0123456789abcdef"
k = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 5000)
print("$pbkdf2-sha256$5000$%s$%s" % (base64.b64encode(salt).decode(), base64.b64encode(k).decode()))
k = hashlib.scrypt(b"pw", salt=salt, n=2048, r=4, p=2, dklen=32)
print("$scrypt$ln=11,r=4,p=2$%s$%s" % (base64.b64encode(salt).decode().rstrip("="), base64.b64encode(k).decode().rstrip("=")))
]]
    local code, out, err = H.run(function() return H.exec(H.python, { "-c", script }) end)
    assert.equal(0, code, err)
    local l1, l2 = out:match("^(%S+)\n(%S+)\n$")
    local h1, h2 = assert(passwd.parse(l1)), assert(passwd.parse(l2))
    assert.equal(5000, h1.iterations)
    assert.equal(2048, h2.N)
    assert.equal(h1.key, kdf.pbkdf2_sha256("pw", "0123456789abcdef", 5000))
    assert.equal(h2.key, kdf.scrypt("pw", "0123456789abcdef", 2048, 4, 2))
  end)

  it("parse() names what is wrong", function()
    local cases = {
      { "plain", "not a hash of the form" },
      { "$md5$1$abc$def", "unknown scheme 'md5'" },
      { "$pbkdf2-sha256$ten$MDEyMzQ1Njc4OWFiY2RlZg$" .. string.rep("A", 43), "bad iteration count" },
      { "$pbkdf2-sha256$10$MDEyMzQ1Njc4OWFiY2RlZg$" .. string.rep("A", 43), "iterations must be from 1000" },
      { "$pbkdf2-sha256$1000$c2FsdA$" .. string.rep("A", 43), "salt must be 8 to 64 octets" },
      { "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$AAAA", "hash must be 16 to 64 octets" },
      { "$pbkdf2-sha256$1000$MDEy*zQ1Njc4OWFiY2RlZg$" .. string.rep("A", 43), "salt must be" },
      { "$scrypt$N=1024$MDEyMzQ1Njc4OWFiY2RlZg$" .. string.rep("A", 43), "ln=<n>,r=<r>,p=<p>" },
      { "$scrypt$ln=25,r=64,p=1$MDEyMzQ1Njc4OWFiY2RlZg$" .. string.rep("A", 43), "more than 1024 MiB" },
    }
    for _, c in ipairs(cases) do
      local h, why = passwd.parse(c[1])
      assert.is_nil(h, c[1])
      assert.truthy(why:find(c[2], 1, true), why)
    end
  end)

  it("b64decode() is strict for SASL: alphabet, length and padding", function()
    assert.equal("\0user\0pass", passwd.b64decode("AHVzZXIAcGFzcw==", true))
    assert.equal("", passwd.b64decode("", true))
    assert.is_nil(passwd.b64decode("AHVzZXIAcGFzcw", true))  -- no padding
    assert.is_nil(passwd.b64decode("AHVz ZXIA", true))
    assert.is_nil(passwd.b64decode("AHVz!XIA", true))
    assert.is_nil(passwd.b64decode("A===", true))
    assert.is_nil(passwd.b64decode("AB==", true))          -- stray bits
    assert.equal("user", passwd.b64decode("dXNlcg"))         -- lenient form for hash strings
    for n = 0, 20 do
      local s = kdf.random(n + 1):sub(1, n)
      assert.equal(s, passwd.b64decode(passwd.b64encode(s), true))
      assert.equal(s, passwd.b64decode(passwd.b64encode(s, false)))
    end
  end)

  it("verify() runs on the kdf threads, and the loop goes on meanwhile", function()
    local h = assert(passwd.parse(assert(passwd.hash("right", { scheme = "scrypt", ln = 14 }))))
    H.run(function()
      local ticks = 0
      local t = uv.new_timer()
      t:start(5, 5, function() ticks = ticks + 1 end)
      local t0 = uv.hrtime()
      assert.is_true(passwd.verify("right", h))
      assert.is_false(passwd.verify("wrong", h))
      local ms = (uv.hrtime() - t0) / 1e6
      t:close()
      -- two scrypt runs of tens of ms each; the 5 ms timer kept firing
      assert.truthy(ticks >= ms / 5 / 3, string.format("%d ticks in %.0f ms", ticks, ms))
      assert.is_false(passwd.verify(string.rep("x", 2000), h))
    end)
  end)
end)
