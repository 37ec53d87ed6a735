# Shell functions the ops scripts share; sourced, not run.

# Run a command as root, through sudo when this shell is not root.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install Debian packages without prompts. A fresh container has no package
# lists, so they are updated only when the install needs it; another install
# may hold dpkg's lock for a while, so wait for it rather than fail.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=300)
  as_root "${apt[@]}" install -y --no-install-recommends "$@" \
    || { as_root "${apt[@]}" update && as_root "${apt[@]}" install -y --no-install-recommends "$@"; }
}

# Stop the daemon whose pid PIDFILE holds and wait until it is gone, at most
# TIMEOUT_S seconds before a SIGKILL, so that a restart in the same folder
# does not race the old process. Nothing to do when PIDFILE is missing.
stop_pidfile() {
  local pidfile=$1 timeout_s=$2
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true

  local deadline=$((SECONDS + timeout_s))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      kill -9 "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.05
  done
  rm -f "$pidfile"
}
