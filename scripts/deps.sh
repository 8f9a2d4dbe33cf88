#!/bin/sh
# Install the Debian packages Moonpost needs to build, run and test, when
# they are missing (make deps; run by make run and make test). Needs root or
# sudo. Postfix is installed for smtp-source/smtp-sink only: preseeded
# "Local only" and its system instance is never started here. swaks needs
# libnet-ssleay-perl for --tls (a Recommends, which --no-install-recommends
# leaves out). btrfs-progs makes the copy-on-write file system of a spool spec.
# publicsuffix is the list DMARC finds organizational domains with; python3-spf
# and python3-authres check SPF results and Authentication-Results fields,
# python3-publicsuffix2 the organizational domains.
set -eu

PKGS="build-essential clang libclang-rt-14-dev luajit libluajit-5.1-dev liblua5.1-0-dev
lua-luv lua-luv-dev libuv1-dev libssl-dev libopendkim-dev libsodium-dev libc-ares-dev libidn2-dev
lua-lpeg lua-cjson lua-busted lua-check luarocks
swaks libnet-ssleay-perl python3 python3-dkim python3-prometheus-client python3-nacl python3-dnspython python3-spf python3-authres python3-publicsuffix2 python3-aiosmtpd publicsuffix nsd postfix netcat-openbsd iproute2 procps valgrind btrfs-progs"

missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing="$missing $p"
  fi
done
if [ -z "$missing" ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "deps: missing packages:$missing (run as root, or install them)" >&2
    exit 1
  fi
else
  SUDO=
fi

echo "deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# Postfix asks questions on install; answer them, and keep it loopback-only.
echo "postfix postfix/main_mailer_type select Local only" | $SUDO debconf-set-selections
echo "postfix postfix/mailname string localhost.localdomain" | $SUDO debconf-set-selections
APT="$SUDO apt-get -y -q -o DPkg::Lock::Timeout=600"
$APT update -qq || true
# shellcheck disable=SC2086
$APT install --no-install-recommends $missing >/dev/null
# The Postfix system instance is not ours to run.
if [ -f /var/spool/postfix/pid/master.pid ] && command -v postfix >/dev/null 2>&1; then
  $SUDO postfix stop >/dev/null 2>&1 || true
fi
echo "deps: done" >&2
