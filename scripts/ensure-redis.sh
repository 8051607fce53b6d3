#!/usr/bin/env bash
# Makes sure a redis-server binary exists: the tests start their own redis-server processes on
# free ports. On Debian/Ubuntu as root it installs the distribution package; elsewhere it stops
# with a message that names the fix.
set -euo pipefail
bin="${TB_REDIS_SERVER_BIN:-redis-server}"
if command -v "$bin" >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "redis-server not found: installing Debian package redis-server" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  command -v "$bin" >/dev/null 2>&1 && exit 0
fi
cat >&2 <<MSG
error: redis-server is not installed, and the tests need it (they start their own redis-server
processes on free ports). Fix: install Redis 6.2 or newer, for example
  sudo apt-get install redis-server     # Debian, Ubuntu
  brew install redis                    # macOS
or point TB_REDIS_SERVER_BIN at a redis-server binary.
MSG
exit 1
