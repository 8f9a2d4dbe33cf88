-- HTTP-dates (RFC 9110 5.6.7) and Retry-After (10.2.3), as the event log's
-- webhook reads them from a 429 or 503 (runtime/http_client.lua).
local http = require "moonpost.runtime.http_client"

describe("http_client.parse_date", function()
  -- RFC 9110's own example, 784111777 seconds after 1970 (date -d ... +%s)
  it("reads the three forms of the RFC's example to the same second", function()
    assert.equal(784111777, http.parse_date("Sun, 06 Nov 1994 08:49:37 GMT"))
    assert.equal(784111777, http.parse_date("Sunday, 06-Nov-94 08:49:37 GMT", os.time({ year = 2026, month = 1, day = 1 })))
    assert.equal(784111777, http.parse_date("Sun Nov  6 08:49:37 1994"))
  end)

  it("counts leap days and the turn of centuries", function()
    assert.equal(951782400, http.parse_date("Tue, 29 Feb 2000 00:00:00 GMT"))
    assert.equal(4107542400, http.parse_date("Mon, 01 Mar 2100 00:00:00 GMT"))
    assert.equal(0, http.parse_date("Thu, 01 Jan 1970 00:00:00 GMT"))
  end)

  it("takes a two-digit year of the RFC 850 form as the nearest past century beyond 50 years ahead", function()
    local now = os.time({ year = 2026, month = 6, day = 1 })
    assert.equal(http.parse_date("Wed, 01 Jan 2070 00:00:00 GMT"), http.parse_date("Wednesday, 01-Jan-70 00:00:00 GMT", now))
    -- 2077 is more than 50 years after 2026: 1977 (date -u -d 1977-01-01 +%s)
    assert.equal(220924800, http.parse_date("Saturday, 01-Jan-77 00:00:00 GMT", now))
  end)

  it("refuses what is not an HTTP-date", function()
    for _, bad in ipairs({ "", "tomorrow", "Sun, 06 Nov 1994 08:49:37 CET", "Sun, 06 Foo 1994 08:49:37 GMT",
      "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 24:00:00 GMT", "1994-11-06T08:49:37Z" }) do
      assert.is_nil(http.parse_date(bad), bad)
    end
    assert.is_nil(http.parse_date(nil))
  end)
end)

describe("http_client.retry_after", function()
  it("is the seconds given, or the time left until the date given, never below 0", function()
    local now = 784111777
    assert.equal(120, http.retry_after("120", now))
    assert.equal(120, http.retry_after(" 120 ", now))
    assert.equal(30, http.retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now))
    assert.equal(0, http.retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now))
    assert.is_nil(http.retry_after("soon", now))
    assert.is_nil(http.retry_after("-5", now))
    assert.is_nil(http.retry_after(nil, now))
  end)
end)
