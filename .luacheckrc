-- luacheck configuration (make lint).
std = "luajit"
codes = true
max_line_length = 120
exclude_files = {
  "build/**", "luarocks-tree/**", "var/**",
  "spec/fixtures/policies/bad_syntax.lua", -- broken on purpose
}
-- Policies and examples run with the launcher's `arg` global.
files["examples/**"] = { read_globals = { "arg" } }
files["scripts/**"] = { read_globals = { "arg" } }
files["runtime/cli.lua"] = { read_globals = { "arg" }, globals = { "arg" } }
files["spec/**"] = {
  std = "+busted",
  max_line_length = false, -- SMTP transcripts read best on one line
  globals = { "MOONPOST_ROOT", "MOONPOST_LOG" },
}
