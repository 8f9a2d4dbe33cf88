-- `luarocks make rockspec/moonpost-scm-1.rockspec --tree DIR` builds and
-- installs the modules and the launcher, and the installed launcher runs
-- the quickstart without the checkout.
local H = require "helpers"

describe("luarocks package", function()
  local work, tree
  setup(function()
    work = H.tmpdir("moonpost-rock-src")
    tree = H.tmpdir("moonpost-rock-tree")
  end)
  teardown(function()
    H.rm_rf(work)
    H.rm_rf(tree)
  end)

  it("installs into a tree and the installed launcher delivers mail", function()
    H.run(function()
      -- LuaRocks builds objects inside the source directory: use a copy.
      local code, out, err = H.exec("/bin/sh", { "-c",
        "tar -C '" .. H.root .. "' --exclude=./build --exclude=./.git -cf - . | tar -C '" .. work .. "' -xf -" })
      assert.equal(0, code, out .. err)
      -- Debian's lua-luv, lua-lpeg and lua-cjson come from apt, which LuaRocks
      -- cannot see: declare them provided (docs/install.md).
      H.write(work .. "/luarocks-config.lua",
        'rocks_provided = { luv = "1.44.2-1", ["lua-cjson"] = "2.1.0-1" }\n')
      code, out, err = H.exec("luarocks", { "make", "rockspec/moonpost-scm-1.rockspec", "--tree", tree },
        { cwd = work, timeout = 300, env = { LUAROCKS_CONFIG = work .. "/luarocks-config.lua" } })
      assert.equal(0, code, out .. err)
      assert.matches("moonpost scm%-1 is now installed", out)
      local bin = tree .. "/bin/moonpost"
      assert.is_truthy(require("luv").fs_stat(tree .. "/lib/lua/5.1/moonpost/core/smtp.so"))

      -- run from a directory that is not the checkout, with the system's paths only
      code, out, err = H.exec(bin, { "check", work .. "/examples/quickstart.lua" },
        { cwd = "/", env = { MOONPOST_DEV_ROOT = false } })
      assert.equal(0, code, err)
      assert.matches(": ok\n$", out)

      local mail = tree .. "/mail"
      local port = H.free_port()
      local uv = require "luv"
      local done = false
      local handle = uv.spawn(bin, {
        args = { "run", work .. "/examples/quickstart.lua" },
        env = { "PATH=" .. os.getenv("PATH"), "MOONPOST_LISTEN=127.0.0.1:" .. port, "MOONPOST_HTTP=127.0.0.1:0", "MOONPOST_MAILDIR=" .. mail,
          "MOONPOST_SPOOL=" .. tree .. "/spool" },
        cwd = "/",
      }, function() done = true end)
      local sched = require "moonpost.runtime.sched"
      local ok = false
      for _ = 1, 100 do
        local p = H.connect(port, "127.0.0.1", 1)
        if p then p:close() ok = true break end
        sched.sleep(0.05)
      end
      assert.is_true(ok, "installed moonpost did not start")
      code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. port, "--to", "rock@example.com",
        "--from", "a@b.c" }, { timeout = 30 })
      H.wait_for(function() return #H.ls(mail .. "/rock/new") == 1 end)
      handle:kill("sigterm")
      while not done do sched.sleep(0.05) end
      handle:close()
      assert.equal(0, code, out)
      assert.equal(1, #H.ls(mail .. "/rock/new"))
    end, 300)
  end)
end)
