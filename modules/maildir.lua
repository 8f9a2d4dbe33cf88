-- moonpost.maildir: local delivery into Maildir folders.
--
--   mta:use(require("moonpost.maildir").deliver { root = "/var/mail" })
--
-- Each recipient's message goes to <root>/<local-part>/new/ (or the folder
-- that opts.folder(rcpt, envelope) returns). A file is written in tmp/,
-- fsynced, renamed into new/, and new/ is fsynced. All file work runs in
-- the libuv thread pool.
--
-- With a spool (moonpost.new { spool = ... }) the block is the transport of
-- spooled mail: delivery happens after the 250, from the spool, and a
-- recipient whose folder cannot be written is retried later. Without a spool
-- it delivers inside smtp_server_message_received, before the 250: every
-- recipient's copy is written and synced before any is renamed, and a
-- failure tempfails the whole message.
local uv = require "luv"
local config = require "moonpost.runtime.config"
local fs = require "moonpost.runtime.fs"
local log = require "moonpost.runtime.log"
local hooks = require "moonpost.runtime.hooks"

local format, gsub, lower = string.format, string.gsub, string.lower

local _M = { _VERSION = "0.1" }

-- The folder name for a local part: quotes and escapes removed, ASCII
-- lower-cased, and nothing that could leave <root> ("/", leading dots,
-- control characters).
function _M.folder_name(localpart)
  local s = localpart
  if s:sub(1, 1) == '"' and s:sub(-1) == '"' and #s >= 2 then
    s = gsub(s:sub(2, -2), "\\(.)", "%1")
  end
  s = lower(s)
  s = gsub(s, "[%z\1-\31/\127\\]", "_")
  s = gsub(s, "^%.", "_")
  if s == "" then s = "_" end
  if #s > 200 then
    -- cut on a UTF-8 character boundary
    local cut = 200
    while cut > 0 and s:byte(cut + 1) and s:byte(cut + 1) >= 0x80 and s:byte(cut + 1) < 0xC0 do cut = cut - 1 end
    s = s:sub(1, cut)
  end
  return s
end

local host_part = gsub(gsub(uv.os_gethostname() or "localhost", "/", "\\057"), ":", "\\072")
local pid = uv.os_getpid()
local seq = 0

local function unique_name(size)
  seq = seq + 1
  local s, us = uv.gettimeofday()
  return format("%d.M%dP%dQ%d.%s,S=%d", s, us, pid, seq, host_part, size)
end

local SCHEMA = {
  root = { type = "string", required = true },
  folder = { type = "function" },
  fsync = { type = "boolean", default = true },
  domains = { type = "list" },
  mode = { type = "nonneg", default = 384 },
}

function _M.deliver(opts)
  local o = config.check("maildir.deliver", opts, SCHEMA)
  local root = o.root:gsub("/+$", "")
  local made = {}  -- folders known to exist

  local function ensure(dir)
    if made[dir] then return true end
    for _, sub in ipairs({ "tmp", "new", "cur" }) do
      local ok, err, code = fs.mkdir_p(dir .. "/" .. sub, 448)
      if not ok then return nil, err, code end
    end
    made[dir] = true
    return true
  end

  -- msg: a message handle (bytes in C) or a string read from the spool
  local function write_tmp(dir, msg)
    local size = type(msg) == "string" and #msg or msg:size()
    local name = unique_name(size)
    local tmp = dir .. "/tmp/" .. name
    local fd, err, code = fs.open(tmp, "wx", o.mode)
    if not fd and code == "ENOENT" then
      -- the folder was removed since it was made (a mailbox reset): again
      made[dir] = nil
      local ok
      ok, err, code = ensure(dir)
      if ok then fd, err, code = fs.open(tmp, "wx", o.mode) end
    end
    if not fd then return nil, err, code end
    local n, werr, wcode
    if type(msg) == "string" then
      n, werr, wcode = fs.write_all(fd, msg, 0)
    else
      n, werr, wcode = msg:write(fd)
    end
    -- a file in new/ is the whole message or nothing (a disk that fills up
    -- mid-write gives a short count before it gives ENOSPC)
    if n and n ~= size then
      n, werr, wcode = nil, format("short write: %d of %d bytes", n, size), "EIO"
    end
    if n and o.fsync then
      local ok, e2, c2 = fs.fsync(fd)
      if not ok then n, werr, wcode = nil, e2, c2 end
    end
    fs.close(fd)
    if not n then
      fs.unlink(tmp)
      return nil, werr, wcode
    end
    return { tmp = tmp, new = dir .. "/new/" .. name, dir = dir }
  end

  local function folder_of(rcpt, ctx)
    if o.folder then
      local dir = o.folder(rcpt, ctx)
      if type(dir) ~= "string" then
        error("maildir.deliver: folder() must return a directory path, got " .. type(dir), 0)
      end
      return dir
    end
    return root .. "/" .. _M.folder_name(rcpt["local"])
  end

  local function store(txn, msg)
    local files, seen = {}, {}
    local failure
    for _, rcpt in ipairs(txn.recipients) do
      local dir = folder_of(rcpt, txn)
      if not seen[dir] then
        seen[dir] = true
        local ok, err = ensure(dir)
        local f
        if ok then f, err = write_tmp(dir, msg) end
        if not f then
          failure = err
          break
        end
        files[#files + 1] = f
      end
    end
    if failure then
      for _, f in ipairs(files) do fs.unlink(f.tmp) end
      log.error("%s: maildir delivery failed: %s", txn.id, tostring(failure))
      return hooks.tempfail(451, "4.3.0", "Local delivery failed, try again later")
    end
    local dirs = {}
    for i, f in ipairs(files) do
      local ok, err = fs.rename(f.tmp, f.new)
      if not ok then
        -- Earlier copies are delivered; remove the rest and let the client retry.
        for k = i, #files do fs.unlink(files[k].tmp) end
        log.error("%s: maildir rename failed: %s", txn.id, tostring(err))
        return hooks.tempfail(451, "4.3.0", "Local delivery failed, try again later")
      end
      dirs[f.dir] = true
    end
    if o.fsync then
      for dir in pairs(dirs) do
        local ok, err = fs.fsync_dir(dir .. "/new")
        if not ok then log.error("%s: maildir fsync of %s/new: %s", txn.id, dir, tostring(err)) end
      end
    end
    txn.notes.maildir = files
    return nil
  end

  -- The transport for spooled mail: one result per recipient.
  local function transport(env, body, rcpts)
    local results, by_dir = {}, {}
    for _, rcpt in ipairs(rcpts) do
      local dir = folder_of(rcpt, env)
      local r = by_dir[dir]
      if r == nil then
        local ok, err = ensure(dir)
        local f
        if ok then f, err = write_tmp(dir, body) end
        if f then
          ok, err = fs.rename(f.tmp, f.new)
          if not ok then fs.unlink(f.tmp) end
        else
          ok = false
        end
        if ok and o.fsync then
          -- The file is in new/ already: a retry would deliver it twice.
          local sok, serr = fs.fsync_dir(dir .. "/new")
          if not sok then log.error("%s: maildir fsync of %s/new: %s", env.id, dir, tostring(serr)) end
        end
        r = ok and { status = "delivered", final = true, text = "2.0.0 delivered to maildir " .. dir }
          or { status = "deferred", text = "4.3.0 maildir " .. dir .. ": " .. tostring(err) }
        by_dir[dir] = r
      end
      results[rcpt.index] = r
    end
    return results
  end

  local block = { name = "maildir.deliver" }
  function block.attach(_, mta)
    if mta:has_spool() then
      mta:add_transport({ name = "maildir.deliver", deliver = transport, domains = o.domains })
    else
      mta:on("smtp_server_message_received", store)
    end
  end
  return block
end

return _M
