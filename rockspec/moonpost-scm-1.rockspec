-- LuaRocks package. From a checkout:
--   luarocks make rockspec/moonpost-scm-1.rockspec --tree DIR
-- then DIR/bin/moonpost run policy.lua. Needs LuaJIT to run (the launcher
-- execs `luajit`); builds against the Lua 5.1 C API.
-- With Debian's lua-luv, lua-lpeg and lua-cjson installed by apt, tell
-- LuaRocks they are present (rocks_provided, see docs/install.md) or pass
-- --deps-mode=none.
rockspec_format = "3.0"
package = "moonpost"
version = "scm-1"
source = {
  url = "git+https://github.com/moonpost/moonpost.git",
}
description = {
  summary = "A programmable mail transfer agent on LuaJIT and libuv",
  detailed = [[
A compact C core (SMTP parsing, TLS, DKIM, spool I/O) under a mail pipeline
written in Lua: accept, route, shape, bounce and suppress, composed in one
policy script.]],
  homepage = "https://github.com/moonpost/moonpost",
  license = "Apache-2.0",
}
dependencies = {
  "lua >= 5.1",
  "luv >= 1.30",
  "lua-cjson >= 2.1",
}
build = {
  type = "builtin",
  modules = {
    ["moonpost"] = "modules/init.lua",
    ["moonpost.accept"] = "modules/accept.lua",
    ["moonpost.admin"] = "modules/admin.lua",
    ["moonpost.bounce"] = "modules/bounce.lua",
    ["moonpost.bounce.rules"] = "modules/bounce/rules.lua",
    ["moonpost.dkim"] = "modules/dkim.lua",
    ["moonpost.eventlog"] = "modules/eventlog.lua",
    ["moonpost.maildir"] = "modules/maildir.lua",
    ["moonpost.metrics"] = "modules/metrics.lua",
    ["moonpost.route"] = "modules/route.lua",
    ["moonpost.sender_auth"] = "modules/sender_auth.lua",
    ["moonpost.shape"] = "modules/shape.lua",
    ["moonpost.shape.defaults"] = "modules/shape/defaults.lua",
    ["moonpost.suppress"] = "modules/suppress.lua",
    ["moonpost.runtime.bucket"] = "runtime/bucket.lua",
    ["moonpost.runtime.cli"] = "runtime/cli.lua",
    ["moonpost.runtime.client"] = "runtime/client.lua",
    ["moonpost.runtime.config"] = "runtime/config.lua",
    ["moonpost.runtime.ctl"] = "runtime/ctl.lua",
    ["moonpost.runtime.devpath"] = "runtime/devpath.lua",
    ["moonpost.runtime.dkim"] = "runtime/dkim.lua",
    ["moonpost.runtime.dmarc"] = "runtime/dmarc.lua",
    ["moonpost.runtime.dns"] = "runtime/dns.lua",
    ["moonpost.runtime.dsn"] = "runtime/dsn.lua",
    ["moonpost.runtime.env"] = "runtime/env.lua",
    ["moonpost.runtime.fs"] = "runtime/fs.lua",
    ["moonpost.runtime.headers"] = "runtime/headers.lua",
    ["moonpost.runtime.http"] = "runtime/http.lua",
    ["moonpost.runtime.http_client"] = "runtime/http_client.lua",
    ["moonpost.runtime.hooks"] = "runtime/hooks.lua",
    ["moonpost.runtime.ids"] = "runtime/ids.lua",
    ["moonpost.runtime.log"] = "runtime/log.lua",
    ["moonpost.runtime.metrics"] = "runtime/metrics.lua",
    ["moonpost.runtime.mime"] = "runtime/mime.lua",
    ["moonpost.runtime.net"] = "runtime/net.lua",
    ["moonpost.runtime.outbox"] = "runtime/outbox.lua",
    ["moonpost.runtime.passwd"] = "runtime/passwd.lua",
    ["moonpost.runtime.policy"] = "runtime/policy.lua",
    ["moonpost.runtime.queue"] = "runtime/queue.lua",
    ["moonpost.runtime.regex"] = "runtime/regex.lua",
    ["moonpost.runtime.reload"] = "runtime/reload.lua",
    ["moonpost.runtime.workers"] = "runtime/workers.lua",
    ["moonpost.runtime.clock"] = "runtime/clock.lua",
    ["moonpost.runtime.fifo"] = "runtime/fifo.lua",
    ["moonpost.runtime.gc"] = "runtime/gc.lua",
    ["moonpost.runtime.sched"] = "runtime/sched.lua",
    ["moonpost.runtime.server"] = "runtime/server.lua",
    ["moonpost.runtime.shape"] = "runtime/shape.lua",
    ["moonpost.runtime.spf"] = "runtime/spf.lua",
    ["moonpost.runtime.spool"] = "runtime/spool.lua",
    ["moonpost.runtime.stream"] = "runtime/stream.lua",
    ["moonpost.runtime.tenants"] = "runtime/tenants.lua",
    ["moonpost.runtime.tls"] = "runtime/tls.lua",
    ["moonpost.runtime.workq"] = "runtime/workq.lua",
    ["moonpost.core.smtp"] = {
      sources = { "core/smtp.c", "core/lsmtp.c" },
      incdirs = { "core" },
      libraries = { "uv" },
    },
    ["moonpost.core.dns"] = {
      sources = { "core/dns.c", "core/ldns.c" },
      incdirs = { "core" },
      libraries = { "cares", "idn2" },
    },
    ["moonpost.core.tls"] = {
      sources = { "core/tls.c", "core/ltls.c" },
      incdirs = { "core" },
      libraries = { "ssl", "crypto" },
    },
    ["moonpost.core.kdf"] = {
      sources = { "core/kdf.c", "core/lkdf.c", "core/workq.c" },
      incdirs = { "core" },
      libraries = { "crypto", "pthread" },
    },
    ["moonpost.core.proc"] = {
      sources = { "core/lproc.c" },
      incdirs = { "core" },
      libraries = { "pthread" },
    },
    ["moonpost.core.spool"] = {
      sources = { "core/spool.c", "core/lspool.c" },
      incdirs = { "core" },
    },
    ["moonpost.core.suppress"] = {
      -- CRC32C comes from the spool's codec
      sources = { "core/suppress.c", "core/lsuppress.c", "core/spool.c" },
      incdirs = { "core" },
    },
    ["moonpost.core.dkim"] = {
      sources = { "core/dkim.c", "core/ldkim.c", "core/workq.c" },
      incdirs = { "core" },
      libraries = { "opendkim", "sodium", "crypto", "pthread" },
    },
  },
  install = {
    bin = { moonpost = "scripts/moonpost", ["dkim-keygen"] = "scripts/dkim-keygen" },
  },
  copy_directories = { "docs", "examples" },
}
