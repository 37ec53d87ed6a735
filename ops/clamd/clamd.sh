#!/usr/bin/env bash
# A private clamd for development and CI: no freshclam, no internet.
#
#   ops/clamd/clamd.sh install
#       Install Debian's clamav-daemon and clamdscan when clamd is missing.
#   ops/clamd/clamd.sh start DIR [--port N] [--max-stream SIZE]
#       Write a two-signature database that detects only the EICAR test string,
#       plus a clamd.conf, into DIR; start clamd on the unix socket DIR/clamd.sock
#       and, unless N is 0, on TCP 127.0.0.1:N (default 13310, away from the
#       standard 3310 so a system clamd does not clash). SIZE is clamd's
#       StreamMaxLength (default 25M, the largest upload kdcube accepts).
#       Prints the scanner URLs, one a line: unix://DIR/clamd.sock, tcp://127.0.0.1:N
#   ops/clamd/clamd.sh stop DIR
#       Stop the clamd started in DIR and wait until it is gone.
#
# clamd is started by hand, not as a service: in containers policy-rc.d forbids
# service starts, and the packaged service would want the full signature
# database that freshclam downloads. The EICAR database loads in well under a
# second and needs about 16 MB of memory.
#
# Environment: CLAMD_START_TIMEOUT_S (default 30) bounds the wait for PING.
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

clamd_binary() {
  command -v clamd || { [ -x /usr/sbin/clamd ] && echo /usr/sbin/clamd; } || true
}

# shellcheck source=ops/lib.sh
source "$(dirname "$0")/../lib.sh"

install_clamd() {
  if [ -n "$(clamd_binary)" ] && command -v clamdscan >/dev/null; then
    echo "clamd already installed: $(clamd_binary)"
    return 0
  fi

  apt_install clamav-daemon clamdscan
  echo "installed: $(clamd_binary)"
}

write_database() {
  local db=$1
  mkdir -p "$db"
  # The test string is assembled from two halves so that this script itself is
  # never mistaken for the test file by a scanner looking at the repository.
  local head='X5O!P%@AP[4\PZX54(P^)7CC)7}'
  local tail='$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
  local md5
  md5=$(printf '%s%s' "$head" "$tail" | md5sum | cut -d' ' -f1)

  # .hdb: MD5 and size of the whole file; .ndb: a hex body at any offset, which
  # also catches the string inside a larger stream.
  echo "$md5:68:Test.EICAR.HDB" > "$db/test.hdb"
  local body
  body=$(printf 'EICAR-STANDARD-ANTIVIRUS-TEST-FILE' | od -An -tx1 | tr -d ' \n')
  echo "Test.EICAR.NDB:0:*:$body" > "$db/test.ndb"
}

write_config() {
  local dir=$1 port=$2 max_stream=$3
  {
    echo "DatabaseDirectory $dir/db"
    echo "LocalSocket $dir/clamd.sock"
    echo "FixStaleSocket yes"
    if [ "$port" != 0 ]; then
      echo "TCPSocket $port"
      echo "TCPAddr 127.0.0.1"
    fi
    echo "Foreground no"
    echo "PidFile $dir/clamd.pid"
    echo "LogFile $dir/clamd.log"
    echo "StreamMaxLength $max_stream"
  } > "$dir/clamd.conf"
}

wait_for_pong() {
  local dir=$1
  local deadline=$((SECONDS + ${CLAMD_START_TIMEOUT_S:-30}))
  until clamdscan --config-file="$dir/clamd.conf" --ping 1 >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "clamd in $dir did not answer PING; its log:" >&2
      tail -n 20 "$dir/clamd.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

start_clamd() {
  local dir=${1:-} port=13310 max_stream=25M
  [ -n "$dir" ] || usage
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --port) port=${2:?--port needs a number}; shift 2 ;;
      --max-stream) max_stream=${2:?--max-stream needs a size such as 25M}; shift 2 ;;
      *) usage ;;
    esac
  done

  local binary
  binary=$(clamd_binary)
  [ -n "$binary" ] || { echo "clamd is not installed: run $0 install" >&2; exit 1; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  write_database "$dir/db"
  write_config "$dir" "$port" "$max_stream"

  "$binary" --config-file="$dir/clamd.conf"
  wait_for_pong "$dir"
  echo "unix://$dir/clamd.sock"
  if [ "$port" != 0 ]; then echo "tcp://127.0.0.1:$port"; fi
}

stop_clamd() {
  local dir=${1:-}
  [ -n "$dir" ] || usage
  # clamd removes its socket on the way out.
  stop_pidfile "$dir/clamd.pid" 10
}

case ${1:-} in
  install) install_clamd ;;
  start) shift; start_clamd "$@" ;;
  stop) shift; stop_clamd "$@" ;;
  *) usage ;;
esac
