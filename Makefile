# Moonpost: the developer's front door.
#
#   make              build the C core as Lua modules into build/lib
#   make deps         install the Debian packages that are missing (apt-get, as root)
#   make run          build, then start examples/quickstart.lua (MOONPOST_* env applies)
#   make test         deps + build + lint + specs + fuzz smoke + rock install;
#                     ends with one line: "N passed, N failed"
#   make test-long    the slow suites (long fuzz run, large loads)
#   make lint         luacheck over every Lua file
#   make fuzz         run the fuzz targets under ASan+UBSan (FUZZ_TIME seconds each)
#   make bench        benchmarks under scripts/bench/ (figures and ratios, not tests)
#   make clean
#
# Knobs (make VAR=value):
#   CC, CFLAGS        compiler and flags (warnings are errors)
#   LUA_INC           Lua headers (default: LuaJIT's)
#   FUZZ_TIME         seconds per fuzz target for `make fuzz` (default 600)
#   FUZZ_SMOKE        seconds per fuzz target inside `make test` (default 20)
#   SPEC              busted arguments for `make test` (default: everything under spec/)

CC        ?= cc
LUA_INC   ?= /usr/include/luajit-2.1
CFLAGS    ?= -O2 -g
WARN      := -Wall -Wextra -Werror
MODCFLAGS := $(CFLAGS) $(WARN) -std=gnu99 -fPIC -fvisibility=hidden -I$(LUA_INC) -Icore
MODLDFLAGS:= -shared
FUZZ_TIME ?= 600
FUZZ_SMOKE?= 20
BUILD     := build
LIBDIR    := $(BUILD)/lib/moonpost/core

SMTP_SRC  := core/smtp.c core/lsmtp.c
SMTP_HDR  := core/smtp.h core/lcompat.h core/lmessage.h
SPOOL_SRC := core/spool.c core/lspool.c
SPOOL_HDR := core/spool.h core/lcompat.h core/lmessage.h core/smtp.h
DNS_SRC   := core/dns.c core/ldns.c
DNS_HDR   := core/dns.h core/lcompat.h
# the DKIM signer and the password pool run their jobs on workq.c's threads
DKIM_SRC  := core/dkim.c core/ldkim.c core/workq.c
DKIM_HDR  := core/dkim.h core/workq.h core/lcompat.h core/lmessage.h core/smtp.h
TLS_SRC   := core/tls.c core/ltls.c
TLS_HDR   := core/tls.h core/lcompat.h
# the suppression store takes CRC32C from the spool's codec
SUPPRESS_SRC := core/suppress.c core/lsuppress.c core/spool.c
SUPPRESS_HDR := core/suppress.h core/spool.h core/lcompat.h
KDF_SRC   := core/kdf.c core/lkdf.c core/workq.c
KDF_HDR   := core/kdf.h core/workq.h core/lcompat.h

MODULES   := $(LIBDIR)/smtp.so $(LIBDIR)/spool.so $(LIBDIR)/dns.so $(LIBDIR)/tls.so
MODULES   += $(LIBDIR)/dkim.so $(LIBDIR)/kdf.so $(LIBDIR)/suppress.so $(LIBDIR)/proc.so

.PHONY: bench-instructions all deps run test test-long lint fuzz fuzz-build bench bench-peers clean

all: $(MODULES)

$(LIBDIR)/smtp.so: $(SMTP_SRC) $(SMTP_HDR)
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ $(SMTP_SRC) -luv

$(LIBDIR)/spool.so: $(SPOOL_SRC) $(SPOOL_HDR)
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ $(SPOOL_SRC)

$(LIBDIR)/dns.so: $(DNS_SRC) $(DNS_HDR)
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ $(DNS_SRC) -lcares -lidn2

$(LIBDIR)/dkim.so: $(DKIM_SRC) $(DKIM_HDR)
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ $(DKIM_SRC) -lopendkim -lsodium -lcrypto -lpthread

$(LIBDIR)/suppress.so: $(SUPPRESS_SRC) $(SUPPRESS_HDR)
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ $(SUPPRESS_SRC)

$(LIBDIR)/tls.so: $(TLS_SRC) $(TLS_HDR)
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ $(TLS_SRC) -lssl -lcrypto

$(LIBDIR)/kdf.so: $(KDF_SRC) $(KDF_HDR)
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ $(KDF_SRC) -lcrypto -lpthread

$(LIBDIR)/proc.so: core/lproc.c core/lcompat.h
	@mkdir -p $(LIBDIR)
	$(CC) $(MODCFLAGS) $(MODLDFLAGS) -o $@ core/lproc.c -lpthread

deps:
	@scripts/deps.sh

run: deps all
	scripts/moonpost run examples/quickstart.lua

lint:
	luacheck --no-color -q .

# Fuzz targets: libFuzzer with AddressSanitizer and UBSan.
FUZZ_CFLAGS := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Icore
FUZZERS     := $(BUILD)/fuzz/fuzz_smtp_in $(BUILD)/fuzz/fuzz_smtp_path $(BUILD)/fuzz/fuzz_smtp_reply \
               $(BUILD)/fuzz/fuzz_spool_scan $(BUILD)/fuzz/fuzz_dns_parse
FUZZERS     += $(BUILD)/fuzz/fuzz_dkim_parse $(BUILD)/fuzz/fuzz_suppress_load

$(BUILD)/fuzz/fuzz_smtp_%: core/fuzz/fuzz_smtp_%.c core/smtp.c core/smtp.h
	@mkdir -p $(BUILD)/fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< core/smtp.c

$(BUILD)/fuzz/fuzz_dns_%: core/fuzz/fuzz_dns_%.c core/dns.c core/dns.h
	@mkdir -p $(BUILD)/fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< core/dns.c

$(BUILD)/fuzz/fuzz_spool_%: core/fuzz/fuzz_spool_%.c core/spool.c core/spool.h
	@mkdir -p $(BUILD)/fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< core/spool.c

$(BUILD)/fuzz/fuzz_suppress_%: core/fuzz/fuzz_suppress_%.c core/suppress.c core/suppress.h core/spool.c core/spool.h
	@mkdir -p $(BUILD)/fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< core/suppress.c core/spool.c

$(BUILD)/fuzz/fuzz_dkim_%: core/fuzz/fuzz_dkim_%.c core/dkim.c core/dkim.h core/workq.c core/workq.h
	@mkdir -p $(BUILD)/fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< core/dkim.c core/workq.c -lopendkim -lsodium -lcrypto -lpthread

fuzz-build: $(FUZZERS)

fuzz: fuzz-build
	@scripts/fuzz.sh $(FUZZ_TIME) $(FUZZERS)

test: deps all
	@scripts/test.sh

test-long: deps all
	@TEST_LONG=1 scripts/test.sh

bench: deps all
	@scripts/bench/run.sh

# Instructions per relayed message under callgrind: a figure the machine's
# noise does not move (scripts/bench/instructions.sh).
bench-instructions: deps all
	@scripts/bench/instructions.sh

# The relay load through Postfix and Moonpost side by side (../shared/peers).
bench-peers: deps all
	@scripts/bench/peers.sh

clean:
	rm -rf $(BUILD)
