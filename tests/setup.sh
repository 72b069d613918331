#!/usr/bin/env sh
# What the test suite needs besides PostgreSQL, Redis and Rust: redis-server and redis-cli (fault and
# cluster tests run servers of their own; `redis-cli --cluster create` makes the 6-node cluster of the
# cluster tests), pgbouncer (the pooler test runs a real one) and chromium (the shop_http test loads the service's live page in headless Chromium). Installs each
# from Debian's packages when it is missing; does nothing otherwise.
set -eu
install() { # package, apt-get options
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/setup.sh: $1 is missing; install it as root: apt-get install -y $1" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086 # the options are words
  apt-get install -y -q $2 "$1" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q $2 "$1" >/dev/null; }
}
if ! command -v redis-server >/dev/null 2>&1; then
  install redis-server ""
fi
if ! command -v redis-cli >/dev/null 2>&1; then
  install redis-tools ""
fi
if ! [ -x /usr/sbin/pgbouncer ] && ! command -v pgbouncer >/dev/null 2>&1; then
  # The package starts nothing we need; the tests run their own pgbouncer on a free port.
  install pgbouncer ""
fi
if ! command -v chromium >/dev/null 2>&1; then
  install chromium --no-install-recommends
fi
