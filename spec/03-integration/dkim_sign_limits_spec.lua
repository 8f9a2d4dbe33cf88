-- dkim.sign: configurations and messages that the block accepted but could
-- not sign, where the client got "421 internal error" (the connection
-- dropped) or a 451 it could never get past. Signatures are checked with
-- Debian's python3-dkim, keys served by nsd on loopback.
local H = require "helpers"

local verify = H.dkim_verify

local function keygen(dir, ktype, domain, selector)
  local code, out, err = H.exec(H.root .. "/scripts/dkim-keygen",
    { "--type", ktype, "--domain", domain, "--selector", selector, "--dir", dir }, { timeout = 60 })
  assert(code == 0, "dkim-keygen: " .. out .. err)
  return out
end

local function zone(records)
  return "$ORIGIN dkim.test.\n$TTL 300\n@ IN SOA ns.dkim.test. hostmaster.dkim.test. 1 3600 600 86400 60\n"
    .. "@ IN NS ns.dkim.test.\nns IN A 127.0.0.1\n" .. table.concat(records, "\n") .. "\n"
end

local function count_sigs(data)
  local n = 0
  for _ in data:gmatch("DKIM%-Signature:") do n = n + 1 end
  return n
end

describe("dkim.sign limits", function()
  local dir, keys, dnsd
  setup(function()
    dir = H.tmpdir("moonpost-dkim-limits")
    keys = dir .. "/dkim"
    local records = {}
    H.run(function()
      records[#records + 1] = keygen(keys, "rsa", "customer.dkim.test", "rsa1")
      for i = 1, 9 do records[#records + 1] = keygen(keys, "ed25519", "m" .. i .. ".dkim.test", "s1") end
      dnsd = H.dns_server({ ["dkim.test"] = zone(records) })
    end, 120)
  end)
  teardown(function()
    H.run(function() dnsd.stop() end)
    H.rm_rf(dir)
  end)

  -- An MTA with this dkim.sign block; returns the reply to one message and
  -- the message as the block left it (nil when it was not accepted).
  local function send_one(opts, body)
    local got
    local mta, port = H.start_mta({}, function(m)
      m:use(require("moonpost.dkim").sign(opts))
      m:add_message_step(function(_, msg) got = msg:tostring() end)
    end)
    local c, e, t = H.send(port, { body = body })
    H.stop_mta(mta)
    return c, e, t, got
  end

  it("makes more than 8 signatures (the C signer's limit per job), all of which verify", function()
    H.run(function()
      local also = {}
      for i = 1, 9 do also[i] = { domain = "m" .. i .. ".dkim.test", selector = "s1" } end
      -- the From domain's signature and 9 others: 10
      local c, _, t, data = send_one({ keys = keys, also = also },
        "From: a@customer.dkim.test\r\nSubject: many\r\n\r\nbody\r\n")
      assert.equal(250, c, t)
      assert.equal(10, count_sigs(data))
      local ok = {}
      for i = 1, 10 do ok[i] = true end
      assert.same(ok, verify(data, dnsd.port))
    end, 120)
  end)

  it("refuses at load a key file whose name is not a selector, naming the file", function()
    local kdir = dir .. "/badname"
    os.execute("mkdir -p " .. kdir .. "/customer.dkim.test && cp " .. keys .. "/customer.dkim.test/rsa1.pem '"
      .. kdir .. "/customer.dkim.test/s2 (copy).pem'")
    local ok, err = pcall(require("moonpost.dkim").sign, { keys = kdir })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("dkim.sign: field 'keys': " .. kdir .. "/customer.dkim.test/s2 (copy).pem", 1,
      true), err)
    -- the same for a domain directory that is not a domain name
    os.execute("rm -rf " .. kdir .. " && mkdir -p '" .. kdir .. "/bad domain' && cp " .. keys
      .. "/customer.dkim.test/rsa1.pem '" .. kdir .. "/bad domain/s1.pem'")
    ok, err = pcall(require("moonpost.dkim").sign, { keys = kdir })
    assert.is_false(ok)
    assert.truthy(tostring(err):find(kdir .. "/bad domain/s1.pem", 1, true), err)
  end)

  it("treats a select() that raises as a signing failure: 451, or unsigned with on_error = 'unsigned'", function()
    H.run(function()
      local body = "From: a@customer.dkim.test\r\nSubject: x\r\n\r\nbody\r\n"
      local c, e, t = send_one({ keys = keys, select = function() error("select is broken") end }, body)
      assert.equal(451, c, t)
      assert.equal("4.3.0", e)
      assert.truthy(H.log("DKIM signing failed: select() raised") ~= "")
      local data
      c, e, t, data = send_one({ keys = keys, on_error = "unsigned", select = function() error("broken") end }, body)
      assert.equal(250, c, e .. " " .. tostring(t))
      assert.equal(0, count_sigs(data))
    end, 60)
  end)

  it("accepts a message without a From field unsigned, even with fallback and also (no 451 forever)", function()
    H.run(function()
      local c, _, t, data = send_one({ keys = keys, fallback = { domain = "m1.dkim.test", selector = "s1" },
        also = { domain = "m2.dkim.test", selector = "s1" } }, "Subject: no from\r\n\r\nbody\r\n")
      assert.equal(250, c, t)
      assert.equal(0, count_sigs(data))
    end, 60)
  end)
end)
