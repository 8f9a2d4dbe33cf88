-- DMARC (RFC 7489): records, From domains, organizational domains, and the
-- verdict against DMARC records served by nsd on loopback.
local H = require "helpers"
local dns = require "moonpost.runtime.dns"
local dmarc = require "moonpost.runtime.dmarc"

local PSL = "/usr/share/publicsuffix/public_suffix_list.dat"

-- An organization of its own ("dmarc.test": the list has no "test", so the
-- default rule "*" makes it one), with subdomains for sp=, and "other.test"
-- with no record at all.
local ZONES = {
  ["dmarc.test."] = [[
$ORIGIN dmarc.test.
$TTL 300
@        IN SOA ns.dmarc.test. hostmaster.dmarc.test. 1 3600 600 86400 60
@        IN NS  ns.dmarc.test.
ns       IN A   127.0.0.1
_dmarc   IN TXT "v=DMARC1; p=reject; sp=quarantine; rua=mailto:agg@dmarc.test"
_dmarc   IN TXT "v=spf1 -all"
; strict alignment
_dmarc.strict IN TXT "v=DMARC1; p=reject; adkim=s; aspf=s"
; two DMARC records: none, and no fallback to the organization's
_dmarc.two    IN TXT "v=DMARC1; p=reject"
_dmarc.two    IN TXT "v=DMARC1; p=none"
; one record in two strings, beside a record that is no DMARC record
_dmarc.split  IN TXT "v=DMARC1; " "p=quarantine"
_dmarc.split  IN TXT "google-site-verification=abc"
; only other TXT records: the organization's record applies
_dmarc.other  IN TXT "v=spf1 -all"
; sampling
_dmarc.pct0r  IN TXT "v=DMARC1; p=reject; pct=0"
_dmarc.pct0q  IN TXT "v=DMARC1; p=quarantine; pct=0"
_dmarc.pct50  IN TXT "v=DMARC1; p=reject; pct=50"
; broken records
_dmarc.badp   IN TXT "v=DMARC1; p=bogus"
_dmarc.badprua IN TXT "v=DMARC1; p=bogus; rua=mailto:agg@dmarc.test"
]],
  -- an organization under a public suffix, for org_domain() without a list
  ["example.com."] = [[
$ORIGIN example.com.
$TTL 300
@        IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 60
@        IN NS  ns.example.com.
ns       IN A   127.0.0.1
_dmarc   IN TXT "v=DMARC1; p=reject"
]],
  -- an organization under a two-label suffix (as bank.co.uk), for the
  -- policy of its subdomains without a list
  ["co.test."] = [[
$ORIGIN co.test.
$TTL 300
@        IN SOA ns.co.test. hostmaster.co.test. 1 3600 600 86400 60
@        IN NS  ns.co.test.
ns       IN A   127.0.0.1
_dmarc.bank IN TXT "v=DMARC1; p=none; sp=reject"
]],
  -- a zone nsd cannot load: it answers SERVFAIL for it
  ["broken.dmarc.test."] = "this is no zone file\n",
  ["other.test."] = [[
$ORIGIN other.test.
$TTL 300
@        IN SOA ns.other.test. hostmaster.other.test. 1 3600 600 86400 60
@        IN NS  ns.other.test.
ns       IN A   127.0.0.1
mail     IN A   127.0.0.2
]],
}

local function with_dmarc(fn)
  H.run(function()
    local srv = H.dns_server(ZONES)
    local r = assert(dns.new { servers = srv.address, timeout = 0.5, tries = 1 })
    local ok, err = pcall(fn, r)
    r:close()
    srv.stop()
    if not ok then error(err, 0) end
  end)
end

local function fixed(x) return function() return x end end

-- A fresh copy of the module that found no public suffix list: io.open
-- refuses the list only while the copy looks for it (on first use).
local function without_psl()
  local name = "moonpost.runtime.dmarc"
  local saved, open = package.loaded[name], io.open
  package.loaded[name] = nil
  local fresh = require(name)
  package.loaded[name] = saved
  io.open = function(path, ...) -- luacheck: ignore 122
    if path == PSL then return nil, path .. ": No such file or directory" end
    return open(path, ...)
  end
  local ok, err = pcall(fresh.org_domain, "example.com")
  io.open = open -- luacheck: ignore 122
  assert(ok, err)
  return fresh
end

describe("moonpost.runtime.dmarc", function()
  describe("parse()", function()
    local DEFAULTS = { v = "DMARC1", adkim = "r", aspf = "r", pct = 100, fo = "0", rf = "afrf", ri = 86400 }
    local function with(t)
      local out = {}
      for k, v in pairs(DEFAULTS) do out[k] = v end
      for k, v in pairs(t) do out[k] = v end
      return out
    end
    local cases = {
      -- text, expected record (or false and the error's pattern)
      { "v=DMARC1; p=reject", with { p = "reject", sp = "reject" } },
      { "v=DMARC1; p=quarantine;", with { p = "quarantine", sp = "quarantine" } },
      { "v=DMARC1;p=reject;sp=none", with { p = "reject", sp = "none" } },
      { "v=DMARC1; p=none; pct=0", with { p = "none", sp = "none", pct = 0 } },
      { "v=DMARC1; p=none; pct=100", with { p = "none", sp = "none" } },
      { "v=DMARC1; p=none; pct=050", with { p = "none", sp = "none", pct = 50 } },
      { "v=DMARC1; p=none; pct=101", with { p = "none", sp = "none" } },
      { "v=DMARC1; p=none; pct=-1", with { p = "none", sp = "none" } },
      { "v=DMARC1; p=none; pct=1000", with { p = "none", sp = "none" } },
      { "v=DMARC1; p=none; pct=half", with { p = "none", sp = "none" } },
      -- whitespace and case: tag names and keyword values are not case-sensitive
      { "  v = DMARC1 ;  P = Reject ; ADKIM=S;aspf = s ; Pct = 20 ; ", with {
        p = "reject", sp = "reject", adkim = "s", aspf = "s", pct = 20 } },
      { "v=DMARC1;\tp=reject;\tsp=Quarantine", with { p = "reject", sp = "quarantine" } },
      -- values that are not valid take the default; unknown tags and stray parts are ignored
      { "v=DMARC1; p=reject; adkim=x; aspf=relaxed; fo=7; rf=; ri=soon; np=reject; x=y; junk",
        with { p = "reject", sp = "reject" } },
      { "v=DMARC1; p=reject; fo=1:d : s; rf=afrf:iodef; ri=3600", with {
        p = "reject", sp = "reject", fo = "1:d:s", rf = "afrf:iodef", ri = 3600 } },
      { "v=DMARC1; p=none; rua=mailto:a@example.org!10m, mailto:b@example.org ,bogus; ruf=mailto:f@example.org",
        with { p = "none", sp = "none", rua = { "mailto:a@example.org!10m", "mailto:b@example.org" },
          ruf = { "mailto:f@example.org" } } },
      -- a duplicate tag: the first one counts
      { "v=DMARC1; p=reject; p=none", with { p = "reject", sp = "reject" } },
      -- 6.6.3: no valid p (or sp), but a reporting URI: p=none
      { "v=DMARC1; p=bogus; rua=mailto:agg@example.org", with {
        p = "none", sp = "none", rua = { "mailto:agg@example.org" } } },
      { "v=DMARC1; rua=mailto:agg@example.org", with { p = "none", sp = "none", rua = { "mailto:agg@example.org" } } },
      { "v=DMARC1; p=reject; sp=maybe; rua=mailto:agg@example.org", with {
        p = "none", sp = "none", rua = { "mailto:agg@example.org" } } },
      -- ... and without one, no record
      { "v=DMARC1; p=bogus", false, "bad p" },
      { "v=DMARC1", false, "no p" },
      { "v=DMARC1; sp=reject; rua=bogus", false, "no p" },
      { "v=DMARC1; p=reject; sp=maybe", false, "bad sp" },
      -- v first, and exactly DMARC1
      { "p=reject; v=DMARC1", false, "not a DMARC1 record" },
      { "v=DMARC2; p=reject", false, "not a DMARC1 record" },
      { "v=dmarc1; p=reject", false, "not a DMARC1 record" },
      { "v=DMARC10; p=reject", false, "not a DMARC1 record" },
      { "v=DMARC1 p=reject", false, "not a DMARC1 record" },
      { "", false, "not a DMARC1 record" },
    }
    for _, c in ipairs(cases) do
      it("parse() reads " .. string.format("%q", c[1]), function()
        local rec, err = dmarc.parse(c[1])
        if c[2] then
          assert.same(c[2], rec, err)
        else
          assert.is_nil(rec)
          assert.equal(c[3], err)
        end
      end)
    end
  end)

  describe("from_domain()", function()
    local cases = {
      { "plain", "From: joe@Example.ORG\r\n", "example.org" },
      { "LF line ends, other fields around", "Subject: hi\nFROM: joe@example.org\nTo: x@y.example\n", "example.org" },
      { "a folded field", "To: x@y.example\r\nFrom: \"Doe,\r\n John\"\r\n\t<john@mail.example.org>\r\nSubject: x\r\n",
        "mail.example.org" },
      { "a folded field (LF)", "From: Joe\n <joe@example.org>\n", "example.org" },
      { "a quoted comma in the display name", 'From: "Doe, John" <john@example.org>\r\n', "example.org" },
      { "an escaped quote and a comma", 'From: "a \\", b@evil.example" <x@example.org>\r\n', "example.org" },
      { "a comment with a comma and an @", "From: john@example.org (Doe, John @ evil.example)\r\n", "example.org" },
      { "an angle address with a comment in it", "From: John <john@(mail)example.org>\r\n", "example.org" },
      { "an obsolete route", "From: <@relay.example,@x.example:john@example.org>\r\n", "example.org" },
      { "a space before the colon (obsolete)", "From : john@example.org\r\n", "example.org" },
      { "a group of one", "From: Team: john@example.org;\r\n", "example.org" },
      { "the header section's end", "From: a@b.example\r\n\r\nFrom: c@d.example\r\n", "b.example" },
      { "another field ending in From", "X-Original-From: a@evil.example\r\nFrom: a@example.org\r\n", "example.org" },
      { "an internationalized domain", "From: Jörg <jörg@Bücher.example>\r\n", "xn--bcher-kva.example" },
      { "an A-label domain", "From: joe@XN--BCHER-KVA.example\r\n", "xn--bcher-kva.example" },
      { "no From", "To: x@y.example\r\nSubject: x\r\n", nil, "no From header" },
      { "two From fields", "From: a@example.org\r\nTo: x@y.example\r\nFrom: a@example.org\r\n", nil,
        "several From headers" },
      { "two addresses", "From: a@example.org, b@example.net\r\n", nil, "several addresses in From" },
      { "two addresses, with names", 'From: "A, a" <a@example.org>,\r\n B <b@example.net>\r\n', nil,
        "several addresses in From" },
      { "a group of two", "From: friends: a@example.org, b@example.net;\r\n", nil, "several addresses in From" },
      { "an empty group", "From: undisclosed-recipients:;\r\n", nil, "no domain in From" },
      { "no address", "From: John Doe\r\n", nil, "no domain in From" },
      { "an empty field", "From:\r\n", nil, "no domain in From" },
      { "an empty angle address", "From: <>\r\n", nil, "no domain in From" },
      { "a domain literal", "From: joe@[192.0.2.1]\r\n", nil, "no domain in From" },
      { "a domain that is no name", "From: joe@exa_mple!.org\r\n", nil, "no domain in From" },
      -- what some reader could take for a second author
      { "two angle addresses without a comma", "From: <ceo@bank.example> <x@evil.example>\r\n", nil,
        "several addresses in From" },
      { "two named angle addresses without a comma", "From: CEO <ceo@bank.example> X <x@evil.example>\r\n", nil,
        "several addresses in From" },
      { "an address for a display name", "From: ceo@bank.example <x@evil.example>\r\n", nil,
        "several addresses in From" },
      { "an address after the angle address", "From: <x@evil.example> ceo@bank.example\r\n", nil,
        "several addresses in From" },
      { "an address for a group name", "From: ceo@bank.example: x@evil.example;\r\n", nil,
        "several addresses in From" },
      { "an address of another domain for a display name", "From: joe@example.org <joe@example.org.evil.example>\r\n",
        nil, "several addresses in From" },
      -- ... and what no reader takes for one
      { "the address for its own display name", "From: Joe@Example.ORG <joe@example.org>\r\n", "example.org" },
      { "an address of the same domain for a display name", "From: info@example.org <joe@example.org>\r\n",
        "example.org" },
      { "an address in a quoted display name", 'From: "a@b.example" <c@d.example>\r\n', "d.example" },
      { "an address in a comment", "From: (ceo@bank.example) <c@d.example> (a@b.example)\r\n", "d.example" },
      { "an address in a quoted group name", 'From: "a@b.example": c@d.example;\r\n', "d.example" },
    }
    for _, c in ipairs(cases) do
      it("from_domain() handles " .. c[1], function()
        assert.same({ c[3], c[4] }, { dmarc.from_domain(c[2]) })
      end)
    end
  end)

  describe("author_domains()", function()
    local many = {}
    for i = 1, 9 do many[i] = "a@d" .. i .. ".example" end
    local cases = {
      { "one address", "From: Joe <joe@Example.ORG>\r\n", { "example.org" } },
      { "two addresses", "From: ceo@bank.example, x@evil.example\r\n", { "bank.example", "evil.example" } },
      { "two From fields", "From: ceo@bank.example\r\nTo: y@z.example\r\nFrom: x@evil.example\r\n",
        { "bank.example", "evil.example" } },
      { "two folded From fields (LF)", "From: CEO\n <ceo@bank.example>\nFrom: X\n\t<x@evil.example>\n",
        { "bank.example", "evil.example" } },
      { "duplicates once, in order", "From: a@evil.example, b@Bank.Example\r\nFrom: c@bank.example., d@EVIL.example\r\n",
        { "evil.example", "bank.example" } },
      { "two angle addresses without a comma", "From: <ceo@bank.example> <x@evil.example>\r\n",
        { "bank.example", "evil.example" } },
      { "an address for a display name", "From: ceo@bank.example <x@evil.example>\r\n",
        { "bank.example", "evil.example" } },
      { "an address after the angle address", "From: <x@evil.example> ceo@bank.example\r\n",
        { "evil.example", "bank.example" } },
      { "an address in a quoted display name", 'From: "a@b.example" <c@d.example>\r\n', { "d.example" } },
      { "the address for its own display name", "From: Joe@Example.ORG <joe@example.org>\r\n", { "example.org" } },
      { "an address in a comment", "From: (a@b.example) c@d.example\r\n", { "d.example" } },
      { "a group", "From: grp: a@x.example, b@y.example;\r\n", { "x.example", "y.example" } },
      { "a group and an address", "From: grp: a@x.example, B <b@y.example>;, c@z.example\r\n",
        { "x.example", "y.example", "z.example" } },
      { "an address for a group name", "From: ceo@bank.example: x@evil.example;\r\n", { "bank.example", "evil.example" } },
      { "an empty group and an address", "From: undisclosed-recipients:;, a@example.org\r\n", { "example.org" } },
      { "an obsolete route", "From: <@relay.example,@x.example:john@example.org>\r\n", { "example.org" } },
      { "an internationalized domain", "From: Jörg <jörg@Bücher.example>, j@xn--bcher-kva.example\r\n",
        { "xn--bcher-kva.example" } },
      -- an address whose domain cannot be read may still be what a reader
      -- sees as the author (a stray byte is often invisible): no list,
      -- so that the caller cannot pass over it to the other authors
      { "a domain literal and a domain", "From: joe@[192.0.2.1], ceo@bank.example\r\n", nil, "an author address without a usable domain" },
      { "a name that is no domain and a domain", "From: joe@exa_mple!.org, <ceo@bank.example>\r\n", nil, "an author address without a usable domain" },
      { "a no-break space after the domain", "From: a@bank.example\194\160\r\n", nil, "an author address without a usable domain" },
      { "a control character after the domain", "From: a@bank.example\1, x@evil.example\r\n", nil, "an author address without a usable domain" },
      { "a stray >", "From: a@bank.example>\r\n", nil, "an author address without a usable domain" },
      { "an escaped >", "From: Bank <a@bank.example\\>\r\n", nil, "an author address without a usable domain" },
      { "an encoded word only", "From: =?utf-8?q?a=40bank.example?=\r\n", nil, "an author address without a usable domain" },
      { "eight domains", "From: " .. table.concat(many, ", ", 1, 8) .. ", a@D1.example\r\n",
        { "d1.example", "d2.example", "d3.example", "d4.example", "d5.example", "d6.example", "d7.example",
          "d8.example" } },
      { "nine domains", "From: " .. table.concat(many, ", ") .. "\r\n", nil, "too many author domains" },
      { "nine domains in two fields", "From: " .. table.concat(many, ", ", 1, 5) .. "\r\nFrom: "
        .. table.concat(many, ", ", 6, 9) .. "\r\n", nil, "too many author domains" },
      { "no From", "To: x@y.example\r\n", nil, "no From header" },
      { "no address", "From: John Doe\r\n", nil, "an author address without a usable domain" },
      { "an empty group", "From: undisclosed-recipients:;\r\n", nil, "no domain in From" },
      { "only a domain literal", "From: joe@[192.0.2.1], <>\r\n", nil, "an author address without a usable domain" },
    }
    for _, c in ipairs(cases) do
      it("author_domains() handles " .. c[1], function()
        assert.same({ c[3], c[4] }, { dmarc.author_domains(c[2]) })
      end)
    end
  end)

  describe("org_domain()", function()
    local cases = {
      { "example.com", "example.com" },
      { "mail.Example.COM.", "example.com" },
      { "a.b.example.co.uk", "example.co.uk" },
      { "co.uk", "co.uk" }, -- a public suffix is its own
      { "com", "com" },
      -- *.ck with the exception !www.ck
      { "foo.bar.ck", "foo.bar.ck" },
      { "x.foo.bar.ck", "foo.bar.ck" },
      { "www.ck", "www.ck" },
      { "a.b.www.ck", "www.ck" },
      -- a suffix of the PRIVATE section
      { "foo.blogspot.com", "foo.blogspot.com" },
      { "a.foo.blogspot.com", "foo.blogspot.com" },
      { "a.b.example.github.io", "example.github.io" },
      -- single labels and unknown TLDs: the default rule "*"
      { "localhost", "localhost" },
      { "a.b.dmarc.test", "dmarc.test" },
      { "dmarc.test", "dmarc.test" },
      -- internationalized: rules and names by their A-labels
      { "www.食狮.com.cn", "xn--85x722f.com.cn" },
      { "a.b.公司.cn", "b.xn--55qx5d.cn" },
      { "a.b.xn--55qx5d.cn", "b.xn--55qx5d.cn" },
      { "x.y.aéroport.ci", "y.xn--aroport-bya.ci" },
    }
    for _, c in ipairs(cases) do
      it("org_domain() of " .. c[1], function()
        assert.equal(c[2], dmarc.org_domain(c[1]))
      end)
    end

    it("load_psl() reads a list of its own, and keeps the one it has when it cannot", function()
      local dir = H.tmpdir("moonpost-psl")
      H.write(dir .. "/list.dat", "// a comment\n\nuk\nco.uk\n*.example\n!keep.example  trailing words\n")
      assert.is_true(dmarc.load_psl(dir .. "/list.dat"))
      assert.equal("example.co.uk", dmarc.org_domain("a.example.co.uk"))
      assert.equal("a.b.example", dmarc.org_domain("x.a.b.example"))
      assert.equal("keep.example", dmarc.org_domain("x.keep.example"))
      assert.equal("example.com", dmarc.org_domain("a.example.com"))
      local ok, err = dmarc.load_psl(dir .. "/missing.dat")
      assert.is_nil(ok)
      assert.matches("missing.dat", err)
      assert.equal("a.b.example", dmarc.org_domain("x.a.b.example"))
      H.rm_rf(dir)
      assert.equal("blogspot.com", dmarc.org_domain("x.foo.blogspot.com"))
      assert.is_true(dmarc.load_psl(PSL))
      assert.equal("foo.blogspot.com", dmarc.org_domain("x.foo.blogspot.com"))
    end)

    it("org_domain() is the domain itself without a list, and says so once", function()
      local fresh = without_psl()
      -- not "co.uk": a.co.uk and b.co.uk are no one organization
      assert.equal("a.b.example.co.uk", fresh.org_domain("a.b.example.co.uk"))
      assert.equal("mail.example.com", fresh.org_domain("Mail.Example.COM."))
      assert.equal("localhost", fresh.org_domain("localhost"))
      local warned = 0
      for _, line in ipairs(MOONPOST_LOG) do
        if line:find("no public suffix list", 1, true) then warned = warned + 1 end
      end
      assert.equal(1, warned)
      -- the module everyone else uses still has its list
      assert.equal("example.co.uk", dmarc.org_domain("a.b.example.co.uk"))
    end)

    -- An independent reading of the same list: Debian's python3-publicsuffix2
    -- (which leaves names under a TLD the list does not know without an
    -- organizational domain, where the list's default rule "*" gives one:
    -- those are the cases above, not these).
    -- (make deps installs it: a machine without it fails here, not passes)
    it("org_domain() agrees with python3-publicsuffix2", function()
      local names = {
        "example.com", "www.example.com", "a.b.c.example.com", "example.co.uk", "a.example.co.uk",
        "a.b.example.co.uk", "co.uk", "uk", "com", "bbc.co.uk", "news.bbc.co.uk",
        "foo.bar.ck", "x.foo.bar.ck", "bar.ck", "www.ck", "a.www.ck", "a.b.www.ck", "ck",
        "a.b.c.kobe.jp", "b.c.kobe.jp", "city.kobe.jp", "a.city.kobe.jp", "x.y.city.kobe.jp",
        "foo.blogspot.com", "a.foo.blogspot.com", "blogspot.com", "a.b.example.github.io", "github.io",
        "a.b.herokuapp.com", "x.s3.amazonaws.com", "a.b.compute.amazonaws.com",
        "x.y.example.com.au", "example.act.edu.au", "a.example.k12.ca.us", "a.b.example.pvt.k12.ma.us",
        "www.xn--85x722f.com.cn", "a.b.xn--85x722f.xn--fiqs8s", "a.xn--fiqs8s",
        "a.b.example.nom.br", "mail.example.de", "a.b.example.jp", "x.example.tokyo.jp",
        "a.b.c.d.e.example.org", "example.museum", "x.y.mm", "a.b.er",
      }
      local script = [[
import sys
from publicsuffix2 import PublicSuffixList
psl = PublicSuffixList(sys.argv[1])
for name in sys.stdin.read().split():
    print(name, psl.get_sld(name, strict=True))
]]
      H.run(function()
        local code, out, err = H.exec(H.python, { "-c", script, PSL }, { stdin = table.concat(names, "\n") })
        assert.equal(0, code, err)
        assert.is_true(dmarc.load_psl(PSL))
        local n = 0
        for name, theirs in out:gmatch("(%S+) (%S+)\n") do
          n = n + 1
          assert.equal(theirs, dmarc.org_domain(name), name)
        end
        assert.equal(#names, n)
      end)
    end)
  end)

  describe("check()", function()
    it("passes by SPF aligned in relaxed mode, and fails without it", function()
      with_dmarc(function(r)
        local res = dmarc.check { dns = r, from_domain = "dmarc.test",
          spf = { result = "pass", domain = "bounce.dmarc.test" }, dkim = {} }
        assert.same({ "pass", "reject", "none", true, false }, {
          res.result, res.policy, res.disposition, res.spf_aligned, res.dkim_aligned })
        assert.same({ "dmarc.test", "dmarc.test", "_dmarc.dmarc.test" }, { res.domain, res.org_domain, res.record_domain })
        assert.equal("reject", res.record.p)
        assert.equal("SPF aligned", res.reason)
        -- SPF of another organization, or an SPF that did not pass
        for _, spf in ipairs({ { result = "pass", domain = "other.test" }, { result = "softfail", domain = "dmarc.test" } }) do
          res = dmarc.check { dns = r, from_domain = "dmarc.test", spf = spf, dkim = {} }
          assert.same({ "fail", "reject", "reject", false }, { res.result, res.policy, res.disposition, res.spf_aligned })
        end
        -- no SPF result at all
        res = dmarc.check { dns = r, from_domain = "dmarc.test", dkim = { { result = "fail", domain = "dmarc.test" } } }
        assert.same({ "fail", "reject", false, false }, { res.result, res.disposition, res.spf_aligned, res.dkim_aligned })
      end)
    end)

    it("fails by SPF or DKIM that is not exactly aligned under aspf=s and adkim=s", function()
      with_dmarc(function(r)
        local res = dmarc.check { dns = r, from_domain = "strict.dmarc.test",
          spf = { result = "pass", domain = "bounce.strict.dmarc.test" },
          dkim = { { result = "pass", domain = "dmarc.test" } } }
        assert.same({ "fail", "reject", "reject", false, false }, {
          res.result, res.policy, res.disposition, res.spf_aligned, res.dkim_aligned })
        assert.equal("_dmarc.strict.dmarc.test", res.record_domain)
        assert.same({ "s", "s" }, { res.record.aspf, res.record.adkim })
        -- the same domain exactly (in another case) is aligned
        res = dmarc.check { dns = r, from_domain = "strict.dmarc.test",
          spf = { result = "pass", domain = "STRICT.dmarc.test" }, dkim = {} }
        assert.same({ "pass", true }, { res.result, res.spf_aligned })
        res = dmarc.check { dns = r, from_domain = "Strict.Dmarc.Test", dkim = {
          { result = "fail", domain = "strict.dmarc.test" }, { result = "pass", domain = "strict.dmarc.test" } } }
        assert.same({ "pass", false, true, "none" }, { res.result, res.spf_aligned, res.dkim_aligned, res.disposition })
      end)
    end)

    it("passes by a DKIM signature of the organizational domain, under its sp=", function()
      with_dmarc(function(r)
        local res = dmarc.check { dns = r, from_domain = "sub.dmarc.test",
          spf = { result = "pass", domain = "other.test" },
          dkim = { { result = "pass", domain = "other.test" }, { result = "pass", domain = "dmarc.test" } } }
        assert.same({ "pass", "quarantine", "none", false, true }, {
          res.result, res.policy, res.disposition, res.spf_aligned, res.dkim_aligned })
        assert.same({ "sub.dmarc.test", "dmarc.test", "_dmarc.dmarc.test" }, { res.domain, res.org_domain, res.record_domain })
        assert.equal("DKIM aligned", res.reason)
      end)
    end)

    it("falls back to the organizational domain's record, whose sp= applies", function()
      with_dmarc(function(r)
        for _, from in ipairs({ "sub.dmarc.test", "a.b.sub.dmarc.test", "other.dmarc.test" }) do
          local res = dmarc.check { dns = r, from_domain = from, spf = nil, dkim = {} }
          assert.same({ "fail", "quarantine", "quarantine", "_dmarc.dmarc.test" }, {
            res.result, res.policy, res.disposition, res.record_domain }, from)
          assert.equal("reject", res.record.p)
        end
        -- the organizational domain itself: p=
        local res = dmarc.check { dns = r, from_domain = "dmarc.test", dkim = {} }
        assert.same({ "fail", "reject", "reject" }, { res.result, res.policy, res.disposition })
      end)
    end)

    it("reads a record given in several strings, among other TXT records", function()
      with_dmarc(function(r)
        local res = dmarc.check { dns = r, from_domain = "split.dmarc.test", dkim = {} }
        assert.same({ "fail", "quarantine", "quarantine", "_dmarc.split.dmarc.test" }, {
          res.result, res.policy, res.disposition, res.record_domain })
      end)
    end)

    it("finds no policy where there is no record, or more than one", function()
      with_dmarc(function(r)
        -- neither _dmarc.mail.other.test nor _dmarc.other.test
        local sent = r.stats.sent
        local res = dmarc.check { dns = r, from_domain = "mail.other.test", dkim = {} }
        assert.same({ "none", "none", "mail.other.test", "other.test" }, {
          res.result, res.disposition, res.domain, res.org_domain })
        assert.is_nil(res.policy)
        assert.is_nil(res.record_domain)
        assert.equal(sent + 2, r.stats.sent)
        -- two DMARC records: none, without looking at the organization's
        sent = r.stats.sent
        res = dmarc.check { dns = r, from_domain = "two.dmarc.test", dkim = {} }
        assert.same({ "none", "none" }, { res.result, res.disposition })
        assert.is_nil(res.policy)
        assert.matches("several DMARC records", res.reason)
        assert.equal(sent + 1, r.stats.sent)
      end)
    end)

    it("is a temperror when the DNS fails, a permerror for a record it cannot use", function()
      with_dmarc(function(r)
        -- SERVFAIL (for the From domain: no fallback to the organization's record)
        local res = dmarc.check { dns = r, from_domain = "broken.dmarc.test", dkim = {} }
        assert.same({ "temperror", "none" }, { res.result, res.disposition }, res.reason)
        assert.is_nil(res.policy)
        assert.equal("_dmarc.broken.dmarc.test: servfail", res.reason)
        res = dmarc.check { dns = r, from_domain = "badp.dmarc.test", dkim = {} }
        assert.same({ "permerror", "none", "_dmarc.badp.dmarc.test" }, { res.result, res.disposition, res.record_domain })
        assert.matches("bad p", res.reason)
        -- with a reporting address: p=none
        res = dmarc.check { dns = r, from_domain = "badprua.dmarc.test", dkim = {} }
        assert.same({ "fail", "none", "none" }, { res.result, res.policy, res.disposition })
        -- no From domain
        res = dmarc.check { dns = r, from_domain = nil, dkim = {} }
        assert.same({ "permerror", "none" }, { res.result, res.disposition })
      end)
    end)

    it("is a temperror when the DNS server does not answer", function()
      H.run(function()
        local r = assert(dns.new { servers = "127.0.0.1:" .. H.free_port(), timeout = 0.3, tries = 1 })
        local res = dmarc.check { dns = r, from_domain = "dmarc.test",
          spf = { result = "pass", domain = "dmarc.test" }, dkim = {} }
        assert.same({ "temperror", "none", false }, { res.result, res.disposition, res.spf_aligned })
        assert.matches("^_dmarc%.dmarc%.test: ", res.reason)
        r:close()
      end)
    end)

    it("applies pct= by sampling, the milder policy to the rest (6.6.4)", function()
      with_dmarc(function(r)
        local res = dmarc.check { dns = r, from_domain = "pct0r.dmarc.test", dkim = {}, random = fixed(0) }
        assert.same({ "fail", "reject", "quarantine" }, { res.result, res.policy, res.disposition })
        assert.matches("sampled out", res.reason)
        res = dmarc.check { dns = r, from_domain = "pct0q.dmarc.test", dkim = {}, random = fixed(0) }
        assert.same({ "fail", "quarantine", "none" }, { res.result, res.policy, res.disposition })
        res = dmarc.check { dns = r, from_domain = "pct50.dmarc.test", dkim = {}, random = fixed(0.49) }
        assert.same({ "fail", "reject" }, { res.result, res.disposition })
        res = dmarc.check { dns = r, from_domain = "pct50.dmarc.test", dkim = {}, random = fixed(0.5) }
        assert.same({ "fail", "quarantine" }, { res.result, res.disposition })
        -- pct=100 (the default) does not sample; a pass is never sampled
        res = dmarc.check { dns = r, from_domain = "dmarc.test", dkim = {}, random = function() error("sampled") end }
        assert.same({ "fail", "reject" }, { res.result, res.disposition })
        res = dmarc.check { dns = r, from_domain = "pct0r.dmarc.test", random = fixed(0),
          dkim = { { result = "pass", domain = "pct0r.dmarc.test" } } }
        assert.same({ "pass", "none" }, { res.result, res.disposition })
      end)
    end)

    it("aligns only identical domains without a list, and still finds the parent's policy", function()
      local fresh = without_psl()
      with_dmarc(function(r)
        -- relaxed alignment: mail.example.com is not example.com's organization
        local res = fresh.check { dns = r, from_domain = "example.com",
          spf = { result = "pass", domain = "mail.example.com" },
          dkim = { { result = "pass", domain = "mail.example.com" } } }
        assert.same({ "fail", "reject", "reject", false, false, "example.com" }, {
          res.result, res.policy, res.disposition, res.spf_aligned, res.dkim_aligned, res.org_domain })
        res = fresh.check { dns = r, from_domain = "mail.example.com",
          dkim = { { result = "pass", domain = "example.com" } } }
        assert.same({ "fail", "reject", false, "_dmarc.example.com" }, {
          res.result, res.disposition, res.dkim_aligned, res.record_domain })
        -- the same domain does
        res = fresh.check { dns = r, from_domain = "Example.COM", spf = { result = "pass", domain = "example.com" } }
        assert.same({ "pass", "none", true }, { res.result, res.disposition, res.spf_aligned })
        -- a subdomain without a record of its own: its parent's sp= applies
        for _, from in ipairs({ "sub.dmarc.test", "a.b.sub.dmarc.test", "a.b.c.d.e.sub.dmarc.test" }) do
          res = fresh.check { dns = r, from_domain = from, dkim = { { result = "pass", domain = "dmarc.test" } } }
          assert.same({ "fail", "quarantine", "quarantine", "_dmarc.dmarc.test", from }, {
            res.result, res.policy, res.disposition, res.record_domain, res.org_domain }, from)
        end
        -- under a suffix of two labels too: every ancestor is looked at,
        -- nearest first, not only the last two labels (co.test)
        -- a name of many labels (it need not exist) still reaches the
        -- organization's: the walk starts at the last 7 labels
        for _, from in ipairs({ "x.bank.co.test", "a.b.c.x.bank.co.test", "a.b.c.d.e.f.g.x.bank.co.test" }) do
          res = fresh.check { dns = r, from_domain = from, dkim = {} }
          assert.same({ "fail", "reject", "_dmarc.bank.co.test" }, { res.result, res.disposition, res.record_domain }, from)
        end
      end)
    end)

    it("looks an internationalized From domain up by its A-labels", function()
      with_dmarc(function(r)
        local res = dmarc.check { dns = r, from_domain = "bücher.dmarc.test", dkim = {
          { result = "pass", domain = "xn--bcher-kva.dmarc.test" } } }
        assert.same({ "pass", "xn--bcher-kva.dmarc.test", "_dmarc.dmarc.test" }, { res.result, res.domain, res.record_domain })
      end)
    end)
  end)

  describe("check_authors()", function()
    -- dmarc.test stands for the bank (p=reject), other.test for the forger's
    -- domain (no record), whose SPF and DKIM pass
    local FORGED = { result = "pass", domain = "other.test" }

    local function verdict(r, head)
      local domains = assert(dmarc.author_domains(head))
      return dmarc.check_authors { dns = r, from_domains = domains, spf = FORGED, dkim = { FORGED } }
    end

    it("applies the bank's policy to a From with a second, unprotected address", function()
      with_dmarc(function(r)
        for _, head in ipairs({
          "From: ceo@dmarc.test, x@other.test\r\n",
          "From: x@other.test, ceo@dmarc.test\r\n",
          "From: <ceo@dmarc.test> <x@other.test>\r\n",
          "From: ceo@dmarc.test <x@other.test>\r\n",
          "From: grp: ceo@dmarc.test, x@other.test;\r\n",
        }) do
          local res = verdict(r, head)
          assert.same({ "fail", "reject", "reject", "dmarc.test", "_dmarc.dmarc.test" }, {
            res.result, res.policy, res.disposition, res.domain, res.record_domain }, head .. tostring(res.reason))
          assert.equal(2, #res.each)
          local bank = res.domains[1] == "dmarc.test" and 1 or 2
          assert.same({ "fail", "none" }, { res.each[bank].result, res.each[3 - bank].result },
            head .. tostring(res.each[3 - bank].reason))
        end
      end)
    end)

    it("applies the bank's policy to two From fields, each domain checked once", function()
      with_dmarc(function(r)
        local res = verdict(r, "From: x@other.test\r\nSubject: hi\r\nFrom: ceo@dmarc.test\r\n")
        assert.same({ "fail", "reject", "dmarc.test" }, { res.result, res.disposition, res.domain })
        assert.same({ "other.test", "dmarc.test" }, res.domains)
        assert.same({ "none", "fail" }, { res.each[1].result, res.each[2].result })
        -- duplicates (in any case, with a final dot, in either field): one check each
        res = verdict(r, "From: ceo@dmarc.test, CEO@DMARC.TEST.\r\nFrom: <ceo@Dmarc.Test>, x@other.test\r\n")
        assert.same({ "fail", "reject" }, { res.result, res.disposition })
        assert.same({ "dmarc.test", "other.test" }, res.domains)
        assert.equal(2, #res.each)
      end)
    end)

    it("is the result of check() for one domain, with domains and each", function()
      with_dmarc(function(r)
        local opts = { dns = r, from_domains = { "sub.dmarc.test" }, spf = FORGED,
          dkim = { { result = "pass", domain = "dmarc.test" } } }
        local res = dmarc.check_authors(opts)
        local alone = dmarc.check { dns = r, from_domain = "sub.dmarc.test", spf = FORGED,
          dkim = { { result = "pass", domain = "dmarc.test" } } }
        assert.equal("pass", alone.result)
        assert.same(alone, res.each[1])
        assert.same({ "sub.dmarc.test" }, res.domains)
        assert.is_not.equal(res, res.each[1])
        res.domains, res.each = nil, nil
        assert.same(alone, res)
        -- opts is left as it was
        assert.is_nil(opts.from_domain)
        assert.same({ "sub.dmarc.test" }, opts.from_domains)
      end)
    end)

    it("takes the strictest disposition, then the strictest result", function()
      with_dmarc(function(r)
        local function pick(domains, random)
          -- a signature of dmarc.test passes every domain but under
          -- strict.dmarc.test; with random, none is given
          local res = dmarc.check_authors { dns = r, from_domains = domains, random = random,
            dkim = random and {} or { { result = "pass", domain = "dmarc.test" } } }
          return { res.result, res.disposition, res.domain }
        end
        -- a pass and no record: none
        assert.same({ "none", "none", "other.test" }, pick({ "dmarc.test", "other.test" }))
        -- a pass, a permerror, a temperror: the temperror
        assert.same({ "temperror", "none", "broken.dmarc.test" },
          pick({ "dmarc.test", "badp.dmarc.test", "broken.dmarc.test", "other.test" }))
        -- a failure that pct= spared (disposition none) outranks a temperror ...
        assert.same({ "fail", "none", "pct0q.dmarc.test" }, pick({ "broken.dmarc.test", "pct0q.dmarc.test" }, fixed(0)))
        -- ... and quarantine outranks it
        assert.same({ "fail", "quarantine", "pct0r.dmarc.test" },
          pick({ "pct0q.dmarc.test", "pct0r.dmarc.test", "broken.dmarc.test" }, fixed(0)))
        -- reject outranks quarantine; among equals, the first
        assert.same({ "fail", "reject", "pct50.dmarc.test" },
          pick({ "pct0r.dmarc.test", "pct50.dmarc.test", "strict.dmarc.test" }, fixed(0)))
        -- no domain: a permerror
        local res = dmarc.check_authors { dns = r, from_domains = {}, dkim = {} }
        assert.same({ "permerror", "none", {}, {} }, { res.result, res.disposition, res.domains, res.each })
      end)
    end)
  end)
end)
