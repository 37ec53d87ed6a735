#!/usr/bin/env bash
# What the local sandbox executor (kdcube.exec.local) needs on the machine.
#
#   ops/exec/local.sh install
#       Install Debian's bubblewrap when bwrap is missing.
#
# The executor also wants to run as root with /sys/fs/cgroup writable, for its
# memory and process limits; without that it falls back to rlimits and says so
# in its log (exec.sandbox.no_cgroups). Nothing here changes cgroups: the
# executor makes its own under /sys/fs/cgroup/.../kdcube.
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# shellcheck source=ops/lib.sh
source "$(dirname "$0")/../lib.sh"

install_bwrap() {
  if command -v bwrap >/dev/null; then
    echo "bubblewrap already installed: $(command -v bwrap) ($(bwrap --version))"
    return 0
  fi

  apt_install bubblewrap
  echo "installed: $(command -v bwrap) ($(bwrap --version))"
}

case ${1:-} in
  install) install_bwrap ;;
  *) usage ;;
esac
