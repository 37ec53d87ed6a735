#!/usr/bin/env bash
# A private Docker daemon and the sandbox image for the docker executor
# (kdcube.exec.docker), for development and CI: no registry, no internet but
# Debian's mirror.
#
#   ops/exec/docker.sh install
#       Install Debian's docker.io and debootstrap when dockerd is missing.
#   ops/exec/docker.sh start DIR
#       Start dockerd with its socket, data and state under DIR and no
#       networking of its own (no docker0 bridge, no iptables rules, no IP
#       forwarding); wait until it answers. Prints its DOCKER_HOST url,
#       unix://DIR/docker.sock.
#   ops/exec/docker.sh stop DIR
#       Stop the dockerd started in DIR and wait until it is gone.
#   ops/exec/docker.sh image [NAME]
#       Build the sandbox image NAME (default kdcube/exec-python:bookworm) in
#       the daemon DOCKER_HOST names, unless it is there already: a minimal
#       Debian bookworm with python3, made by debootstrap and docker import.
#       The root file system is cached as a tarball under
#       ${KDCUBE_CACHE:-$HOME/.cache/kdcube}/, so later builds skip debootstrap.
#
# Environment: DOCKER_START_TIMEOUT_S (default 30) bounds the wait for the
# daemon; DEBIAN_MIRROR (default http://deb.debian.org/debian) is where
# debootstrap fetches from.
set -euo pipefail

DEFAULT_IMAGE=kdcube/exec-python:bookworm
API=v1.41

usage() {
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# shellcheck source=ops/lib.sh
source "$(dirname "$0")/../lib.sh"

dockerd_binary() {
  command -v dockerd || { [ -x /usr/sbin/dockerd ] && echo /usr/sbin/dockerd; } || true
}

# The client that came with the daemon: a newer one earlier on PATH (such as
# /usr/local/bin/docker) may speak an API version the daemon does not.
docker_client() {
  if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi
}

install_docker() {
  if [ -n "$(dockerd_binary)" ] && command -v debootstrap >/dev/null; then
    echo "dockerd already installed: $(dockerd_binary)"
    return 0
  fi

  apt_install docker.io debootstrap
  echo "installed: $(dockerd_binary)"
}

answers() {
  local socket=$1
  curl --silent --fail --max-time 2 --unix-socket "$socket" "http://docker/$API/_ping" >/dev/null 2>&1
}

wait_for_daemon() {
  local dir=$1 pid=$2
  local deadline=$((SECONDS + ${DOCKER_START_TIMEOUT_S:-30}))
  until answers "$dir/docker.sock"; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      echo "dockerd in $dir did not answer; its log:" >&2
      tail -n 20 "$dir/dockerd.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

start_docker() {
  local dir=${1:-}
  [ -n "$dir" ] || usage
  local binary
  binary=$(dockerd_binary)
  [ -n "$binary" ] || { echo "dockerd is not installed: run $0 install" >&2; exit 1; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)

  # Default flags would add a docker0 bridge, NAT rules and turn on the
  # host's IP forwarding; sandboxed runs have no network, so none is needed.
  # setsid: the daemon must outlive this script and the shell that ran it.
  setsid "$binary" \
    --host "unix://$dir/docker.sock" \
    --data-root "$dir/data" \
    --exec-root "$dir/exec" \
    --pidfile "$dir/dockerd.pid" \
    --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    </dev/null >"$dir/dockerd.log" 2>&1 &
  wait_for_daemon "$dir" $!
  echo "unix://$dir/docker.sock"
}

stop_docker() {
  local dir=${1:-}
  [ -n "$dir" ] || usage
  # dockerd stops its containers and containerd on the way out.
  stop_pidfile "$dir/dockerd.pid" 20
}

cache_dir() {
  echo "${KDCUBE_CACHE:-$HOME/.cache/kdcube}"
}

build_rootfs() {
  local tarball=$1
  command -v debootstrap >/dev/null || { echo "debootstrap is not installed: run $0 install" >&2; exit 1; }
  local work
  work=$(mktemp -d "$(dirname "$tarball")/rootfs.XXXXXX")
  # shellcheck disable=SC2064 # expand now: work is local to this function
  trap "as_root rm -rf '$work'" EXIT

  as_root debootstrap --variant=minbase --include=python3-minimal \
    bookworm "$work/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
  # What a program run in the sandbox never needs: package caches and docs.
  as_root rm -rf "$work/rootfs/var/cache/apt" "$work/rootfs/var/lib/apt/lists" \
    "$work/rootfs/usr/share/doc" "$work/rootfs/usr/share/man" "$work/rootfs/usr/share/locale"
  as_root mkdir -p "$work/rootfs/workspace"
  as_root tar -C "$work/rootfs" --numeric-owner -czf "$work/rootfs.tar.gz" .
  mv "$work/rootfs.tar.gz" "$tarball"
  as_root rm -rf "$work"
  trap - EXIT
}

build_image() {
  local name=${1:-$DEFAULT_IMAGE}
  local docker
  docker=$(docker_client)
  [ -n "$docker" ] || { echo "no docker client: run $0 install" >&2; exit 1; }
  if "$docker" image inspect "$name" >/dev/null 2>&1; then
    echo "image $name already present"
    return 0
  fi

  local cache tarball
  cache=$(cache_dir)
  mkdir -p "$cache"
  tarball=$cache/exec-python-bookworm-rootfs.tar.gz
  if [ ! -s "$tarball" ]; then
    echo "building the root file system with debootstrap (about a minute)" >&2
    build_rootfs "$tarball"
  fi
  "$docker" import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8' \
    --change 'WORKDIR /workspace' \
    --change 'USER 65534:65534' \
    --change 'CMD ["python3"]' \
    "$tarball" "$name" >/dev/null
  echo "image $name built"
}

case ${1:-} in
  install) install_docker ;;
  start) shift; start_docker "$@" ;;
  stop) shift; stop_docker "$@" ;;
  image) shift; build_image "$@" ;;
  *) usage ;;
esac
