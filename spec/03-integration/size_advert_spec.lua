-- The SIZE keyword of EHLO (RFC 1870) is a number of digits: a large
-- max_message_size was advertised as "SIZE 1.073741824e+15".
local H = require "helpers"

describe("EHLO SIZE", function()
  it("is written in digits for a large max_message_size", function()
    H.run(function()
      local mta, port = H.start_mta({ max_message_size = "1000000G" })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO client.test")
      local t = p:expect(250)
      assert.truthy(t:find("SIZE 1073741824000000", 1, true), t)
      p:close()
      H.stop_mta(mta)
    end)
  end)
end)
