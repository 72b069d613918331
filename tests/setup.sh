#!/usr/bin/env sh
# What the test suite needs besides PostgreSQL, Redis and Rust: pgbouncer (the pooler test runs a real
# one). Installs it from Debian's packages when it is missing; does nothing otherwise.
set -eu
if [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/setup.sh: pgbouncer is missing; install it as root: apt-get install -y pgbouncer" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q pgbouncer >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q pgbouncer >/dev/null; }
# The package starts nothing we need; the tests run their own pgbouncer on a free port.
