-- queue.split(address): the local part and the domain a delivery routes
-- on, split at the last @ (a quoted local part may hold an @ of its own).
local queue = require "moonpost.runtime.queue"

describe("moonpost.runtime.queue split", function()
  it("splits at the last @", function()
    assert.same({ "user", "example.test" }, { queue.split("user@example.test") })
    assert.same({ '"a@b"', "example.test" }, { queue.split('"a@b"@example.test') })
    assert.same({ "a@b@c", "d.test" }, { queue.split("a@b@c@d.test") })
  end)

  it("keeps the domain's case and an empty side as it is", function()
    assert.same({ "User", "Example.TEST" }, { queue.split("User@Example.TEST") })
    assert.same({ "user", "" }, { queue.split("user@") })
    assert.same({ "", "example.test" }, { queue.split("@example.test") })
  end)

  it("gives the whole address and no domain when there is no @", function()
    assert.same({ "postmaster", "" }, { queue.split("postmaster") })
    assert.same({ "", "" }, { queue.split("") })
  end)
end)
