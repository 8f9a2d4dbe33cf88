-- The MOONPOST_* environment, read once, with the defaults that every shipped
-- example uses (docs/cli.md#environment). Examples read their
-- addresses and paths from here so one file runs on a laptop, in CI and in a
-- container:
--
--   listen    MOONPOST_LISTEN     list of "host:port" / "[v6]:port"   127.0.0.1:2525
--   http      MOONPOST_HTTP       "host:port"                        127.0.0.1:8025
--   spool     MOONPOST_SPOOL      directory                          ./var/spool
--   maildir   MOONPOST_MAILDIR    directory                          ./var/mail
--   relay     MOONPOST_RELAY      "host:port" or nil (MX routing)
--   dns       MOONPOST_DNS        "host:port" or nil (/etc/resolv.conf)
--   tls_cert, tls_key  MOONPOST_TLS_CERT / MOONPOST_TLS_KEY, or nil
--   dkim_dir  MOONPOST_DKIM_DIR   or nil
--   api_token MOONPOST_API_TOKEN  or nil
--   hostname  MOONPOST_HOSTNAME   or the system host name
local uv = require "luv"

local getenv = os.getenv

local function get(name, default)
  local v = getenv(name)
  if v == nil or v == "" then return default end
  return v
end

local function list(s)
  local out = {}
  for item in s:gmatch("[^,%s]+") do out[#out + 1] = item end
  return out
end

local _M = {
  listen = list(get("MOONPOST_LISTEN", "127.0.0.1:2525")),
  http = get("MOONPOST_HTTP", "127.0.0.1:8025"),
  spool = get("MOONPOST_SPOOL", "./var/spool"),
  maildir = get("MOONPOST_MAILDIR", "./var/mail"),
  relay = get("MOONPOST_RELAY"),
  dns = get("MOONPOST_DNS"),
  tls_cert = get("MOONPOST_TLS_CERT"),
  tls_key = get("MOONPOST_TLS_KEY"),
  dkim_dir = get("MOONPOST_DKIM_DIR"),
  api_token = get("MOONPOST_API_TOKEN"),
  hostname = get("MOONPOST_HOSTNAME") or uv.os_gethostname() or "localhost",
}

-- get(name, default): any other variable, with the same empty-is-unset rule.
_M.get = get

return _M
