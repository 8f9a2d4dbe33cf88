-- moonpost.accept: where mail comes in.
--
--   mta:use(require("moonpost.accept").smtp {
--     listen = { "0.0.0.0:25", "[::]:25" },
--     max_message_size = "50M",
--     max_recipients = 1000,
--   })
--
-- Every option is in docs/accept.md.
local config = require "moonpost.runtime.config"
local tls = require "moonpost.runtime.tls"
local log = require "moonpost.runtime.log"

local _M = { _VERSION = "0.1" }

local EXTENSIONS = { "pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8",
  "chunking", "dsn" }

local SMTP_SCHEMA = {
  listen = { type = "list", default = function() return { "127.0.0.1:2525" } end },
  name = { type = "string" },
  hostname = { type = "string" },
  banner = { type = "string" },
  -- bodies are held in memory until spooled: the cap must be finite
  max_message_size = { type = "size", default = 52428800,
    check = function(v) return v >= 1, "must be at least 1 (there is always a limit)" end },
  max_recipients = { type = "posint", default = 1000 },
  max_errors = { type = "posint", default = 20 },
  max_connections = { type = "posint", default = 10000 },
  max_command_length = { type = "posint", default = 512,
    check = function(v) return v >= 64, "must be at least 64" end },
  max_line_length = { type = "nonneg", default = 1000 },
  command_timeout = { type = "duration", default = 300, check = function(v) return v > 0, "must be > 0" end },
  data_timeout = { type = "duration", default = 180, check = function(v) return v > 0, "must be > 0" end },
  send_timeout = { type = "duration", default = 300, check = function(v) return v > 0, "must be > 0" end },
  bare_lf = { type = "enum", values = { "normalize", "reject" }, default = "normalize" },
  extensions = { type = "table" },
  backlog = { type = "posint", default = 511 },
  log_messages = { type = "boolean", default = true },
  input_high_water = { type = "size", default = 1048576 },
  tls = { type = "table" },
}

local function check_extensions(t)
  local out = {}
  for _, name in ipairs(EXTENSIONS) do out[name] = true end
  if t == nil then return out end
  for k, v in pairs(t) do
    if out[k] == nil then
      config.raise(string.format("accept.smtp: field 'extensions': unknown extension '%s' (known: %s)",
        tostring(k), table.concat(EXTENSIONS, ", ")))
    end
    if type(v) ~= "boolean" then
      config.raise(string.format("accept.smtp: field 'extensions.%s': expected true or false, got %s",
        k, tostring(v)))
    end
    out[k] = v
  end
  return out
end

-- smtp(opts) -> block: SMTP listeners on every address in opts.listen.
function _M.smtp(opts)
  local o = config.check("accept.smtp", opts, SMTP_SCHEMA)
  o.extensions = check_extensions(o.extensions)
  o.timeouts = { command = o.command_timeout, data = o.data_timeout, send = o.send_timeout }
  local addrs = {}
  for i, a in ipairs(o.listen) do
    local host, port = config.parse_address(a)
    if not host then
      config.raise(string.format("accept.smtp: field 'listen' item %d: %s", i, port))
    end
    addrs[i] = { host = host, port = port }
  end
  if o.tls then o.tls_state = tls.server_state("accept.smtp", o.tls) end
  local block = { name = "accept.smtp", opts = o }
  -- SIGHUP: certificates and keys are read again; a bad file keeps the old ones
  function block.reload()
    local st = o.tls_state
    if not st then return true end
    local ok, err = st:reload()
    if ok then
      log.info("accept.smtp %s: TLS certificates reloaded", o.name or o.listen[1])
    else
      log.error("accept.smtp %s: TLS reload failed, keeping the old certificates: %s", o.name or o.listen[1],
        tostring(err))
    end
    return ok, err
  end
  function block.attach(_, mta)
    for _, a in ipairs(addrs) do
      mta:add_listener({ host = a.host, port = a.port, opts = o, name = o.name })
    end
  end
  return block
end

return _M
