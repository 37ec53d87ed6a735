#!/usr/bin/env bash
# The edge on nginx or OpenResty: kdcube's routing table as an nginx
# configuration, rendered for one deployment.
#
#   ops/edge/nginx.sh install
#       Install Debian's nginx when neither nginx nor openresty is there.
#   ops/edge/nginx.sh render OUT_DIR
#       Write OUT_DIR/nginx.conf and the files it includes from the templates
#       in edge/openresty/, with the addresses below. Everything nginx writes
#       (pid, logs, temporary files) stays under OUT_DIR, so the result runs
#       as any user: nginx -p OUT_DIR -c OUT_DIR/nginx.conf -e OUT_DIR/logs/error.log
#   ops/edge/nginx.sh test OUT_DIR
#       nginx -t on what render wrote.
#
# Environment read by render (defaults in brackets):
#   KDCUBE_INGRESS_ADDR [127.0.0.1:8010], KDCUBE_PROC_ADDR [127.0.0.1:8020],
#   KDCUBE_METRICS_ADDR [127.0.0.1:8090]: the roles, as host:port.
#   KDCUBE_EDGE_LISTEN [8080]: what nginx listens on, port or addr:port.
#   KDCUBE_UI_DIR [edge/ui of this checkout]: the web UI, with its index.html.
#   KDCUBE_TLS_CERT, KDCUBE_TLS_KEY: PEM files; both set serves TLS and HSTS.
#   KDCUBE_PROXYLOGIN_ADDR: a ProxyLogin as host:port; /auth/ goes to its /v1/.
#   KDCUBE_AUTH [dev], KDCUBE_UI_LOGIN_URL: the UI's /config.json (sign-in
#     mode, login page; /auth/login when there is a ProxyLogin).
#   KDCUBE_EDGE_USER: the user (and group) of the worker processes when nginx
#     starts as root; unset, nginx's own default (nobody).
#   KDCUBE_EDGE_WORKERS [auto]: worker processes.
#   KDCUBE_EDGE_CHAT_RATE [10r/s]: POST /sse/chat per client address (burst
#     20), as nginx's rate (N r/s or N r/m); off: no limit (load tests).
#   NGINX: the nginx binary [nginx, else openresty, on PATH or in sbin].
set -euo pipefail

usage() {
  sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# shellcheck source=ops/lib.sh
source "$(dirname "$0")/../lib.sh"

TEMPLATES=$(cd "$(dirname "$0")/../../edge/openresty" && pwd)

nginx_binary() {
  if [ -n "${NGINX:-}" ]; then echo "$NGINX"; return 0; fi
  command -v nginx || command -v openresty \
    || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } \
    || { [ -x /usr/local/openresty/bin/openresty ] && echo /usr/local/openresty/bin/openresty; } \
    || true
}

install_nginx() {
  if [ -n "$(nginx_binary)" ]; then
    echo "nginx already installed: $(nginx_binary)"
    return 0
  fi

  # gettext-base brings envsubst, which render uses.
  apt_install nginx gettext-base
  # The package starts a system nginx on port 80; the edge runs its own with
  # the rendered configuration, so that one is stopped where it was started.
  as_root systemctl disable --now nginx >/dev/null 2>&1 || true
  echo "installed: $(nginx_binary)"
}

# "1.22.1" from `nginx -v`, which prints to stderr; empty without a binary.
nginx_version() {
  local binary
  binary=$(nginx_binary)
  [ -n "$binary" ] || return 0
  "$binary" -v 2>&1 | sed -n 's|.*/\([0-9][0-9.]*\).*|\1|p' | head -n 1
}

# nginx 1.25.1 turned HTTP/2 into a server directive (`http2 on`) and
# deprecated the listen parameter; older ones (Debian 12 has 1.22) know only
# the parameter. Without a binary to ask, the old form is the one every
# version still accepts.
http2_is_directive() {
  local version major minor patch
  version=$(nginx_version)
  [ -n "$version" ] || return 1
  IFS=. read -r major minor patch _ <<<"$version"
  (( major > 1 || (major == 1 && (minor > 25 || (minor == 25 && ${patch:-0} >= 1))) ))
}

check_addr() {
  local name=$1 value=$2
  if ! [[ $value =~ ^[A-Za-z0-9._-]+:[0-9]+$ || $value =~ ^\[[0-9A-Fa-f:.]+\]:[0-9]+$ ]]; then
    echo "$name=$value is not host:port (such as 127.0.0.1:8010)" >&2
    exit 2
  fi
}

# Fill TEMPLATE's ${KDCUBE_...} and write it to OUT. The list keeps envsubst
# away from nginx's own variables ($host, $remote_addr, ...).
fill() {
  local template=$1 out=$2
  local names='${KDCUBE_INGRESS_ADDR} ${KDCUBE_PROC_ADDR} ${KDCUBE_METRICS_ADDR}
    ${KDCUBE_EDGE_LISTEN} ${KDCUBE_UI_DIR} ${KDCUBE_TLS_CERT} ${KDCUBE_TLS_KEY}
    ${KDCUBE_PROXYLOGIN_ADDR} ${KDCUBE_EDGE_DIR} ${KDCUBE_EDGE_MAIN}
    ${KDCUBE_EDGE_LISTEN_TLS} ${KDCUBE_EDGE_CONFIG_JSON}
    ${KDCUBE_EDGE_CHAT_RATE} ${KDCUBE_EDGE_CHAT_LIMIT}'
  envsubst "$names" <"$TEMPLATES/$template" >"$out"
}

# /config.json for the UI, as kdcube's own edge builds it: the sign-in mode
# and where to log in (ProxyLogin's page when there is one). The value ends
# up inside a quoted nginx string, where ' ends it and $ names a variable,
# so a URL with either is refused rather than escaped.
config_json() {
  local auth=${KDCUBE_AUTH:-dev} login=${KDCUBE_UI_LOGIN_URL:-}
  case $auth in
    dev | oidc) ;;
    *) echo "KDCUBE_AUTH=$auth is not dev or oidc" >&2; exit 2 ;;
  esac
  if [ -z "$login" ] && [ -n "${KDCUBE_PROXYLOGIN_ADDR:-}" ]; then login=/auth/login; fi
  if [ -z "$login" ]; then
    printf '{"auth": "%s", "login_url": null}' "$auth"
  elif [[ $login =~ ^[A-Za-z0-9:/?#@!\&()*+,=._~%-]+$ ]]; then
    printf '{"auth": "%s", "login_url": "%s"}' "$auth" "$login"
  else
    echo "KDCUBE_UI_LOGIN_URL=$login has characters a URL should escape (quotes, \$, spaces)" >&2
    exit 2
  fi
}

render() {
  local dir=${1:-}
  [ -n "$dir" ] || usage
  command -v envsubst >/dev/null || { echo "envsubst is missing: apt-get install gettext-base" >&2; exit 1; }

  export KDCUBE_INGRESS_ADDR=${KDCUBE_INGRESS_ADDR:-127.0.0.1:8010}
  export KDCUBE_PROC_ADDR=${KDCUBE_PROC_ADDR:-127.0.0.1:8020}
  export KDCUBE_METRICS_ADDR=${KDCUBE_METRICS_ADDR:-127.0.0.1:8090}
  export KDCUBE_EDGE_LISTEN=${KDCUBE_EDGE_LISTEN:-8080}
  export KDCUBE_UI_DIR=${KDCUBE_UI_DIR:-$TEMPLATES/../ui}
  check_addr KDCUBE_INGRESS_ADDR "$KDCUBE_INGRESS_ADDR"
  check_addr KDCUBE_PROC_ADDR "$KDCUBE_PROC_ADDR"
  check_addr KDCUBE_METRICS_ADDR "$KDCUBE_METRICS_ADDR"
  if ! [[ $KDCUBE_EDGE_LISTEN =~ ^([0-9]+|.+:[0-9]+)$ ]]; then
    echo "KDCUBE_EDGE_LISTEN=$KDCUBE_EDGE_LISTEN is not a port or addr:port" >&2
    exit 2
  fi
  [ -f "$KDCUBE_UI_DIR/index.html" ] || { echo "KDCUBE_UI_DIR=$KDCUBE_UI_DIR has no index.html" >&2; exit 2; }
  KDCUBE_UI_DIR=$(cd "$KDCUBE_UI_DIR" && pwd)

  local tls=
  if [ -n "${KDCUBE_TLS_CERT:-}${KDCUBE_TLS_KEY:-}" ]; then
    [ -n "${KDCUBE_TLS_CERT:-}" ] && [ -n "${KDCUBE_TLS_KEY:-}" ] \
      || { echo "KDCUBE_TLS_CERT and KDCUBE_TLS_KEY go together: set both or neither" >&2; exit 2; }
    [ -r "$KDCUBE_TLS_CERT" ] || { echo "KDCUBE_TLS_CERT=$KDCUBE_TLS_CERT cannot be read" >&2; exit 2; }
    [ -r "$KDCUBE_TLS_KEY" ] || { echo "KDCUBE_TLS_KEY=$KDCUBE_TLS_KEY cannot be read" >&2; exit 2; }
    export KDCUBE_TLS_CERT KDCUBE_TLS_KEY
    KDCUBE_TLS_CERT=$(realpath "$KDCUBE_TLS_CERT")
    KDCUBE_TLS_KEY=$(realpath "$KDCUBE_TLS_KEY")
    tls=1
  fi
  if [ -n "${KDCUBE_PROXYLOGIN_ADDR:-}" ]; then
    check_addr KDCUBE_PROXYLOGIN_ADDR "$KDCUBE_PROXYLOGIN_ADDR"
    export KDCUBE_PROXYLOGIN_ADDR
  fi

  export KDCUBE_EDGE_CONFIG_JSON
  KDCUBE_EDGE_CONFIG_JSON=$(config_json)

  # One address sends all of a load generator's requests, which the chat
  # limit would refuse; off drops the directive and leaves the zone unused.
  local chat_rate=${KDCUBE_EDGE_CHAT_RATE:-10r/s}
  export KDCUBE_EDGE_CHAT_RATE=$chat_rate KDCUBE_EDGE_CHAT_LIMIT
  if [ "$chat_rate" = off ]; then
    KDCUBE_EDGE_CHAT_RATE=10r/s
    KDCUBE_EDGE_CHAT_LIMIT="# no rate limit: rendered with KDCUBE_EDGE_CHAT_RATE=off"
  elif [[ $chat_rate =~ ^[1-9][0-9]*r/[sm]$ ]]; then
    KDCUBE_EDGE_CHAT_LIMIT="limit_req zone=kdcube_chat burst=20 nodelay;"
  else
    echo "KDCUBE_EDGE_CHAT_RATE=$chat_rate is not N r/s, N r/m (such as 10r/s) or off" >&2
    exit 2
  fi

  mkdir -p "$dir"
  export KDCUBE_EDGE_DIR
  KDCUBE_EDGE_DIR=$(cd "$dir" && pwd)
  # Directives of the main context that depend on who runs nginx.
  export KDCUBE_EDGE_MAIN="worker_processes ${KDCUBE_EDGE_WORKERS:-auto};"
  if [ -n "${KDCUBE_EDGE_USER:-}" ]; then
    KDCUBE_EDGE_MAIN+=$'\n'"user ${KDCUBE_EDGE_USER};"
  fi

  # A second render into the same folder must not keep fragments of the first.
  rm -rf "$KDCUBE_EDGE_DIR/http.d" "$KDCUBE_EDGE_DIR/server.d"
  mkdir -p "$KDCUBE_EDGE_DIR"/{http.d,server.d,logs,tmp}
  fill nginx.conf.template "$KDCUBE_EDGE_DIR/nginx.conf"
  cp "$TEMPLATES/headers.conf" "$KDCUBE_EDGE_DIR/headers.conf"
  if [ -n "$tls" ]; then
    if http2_is_directive; then
      export KDCUBE_EDGE_LISTEN_TLS="ssl;"$'\n'"    http2 on;"
    else
      export KDCUBE_EDGE_LISTEN_TLS="ssl http2;"
    fi
    fill tls.conf.template "$KDCUBE_EDGE_DIR/server.d/listen.conf"
    # Every location that sets a header of its own includes headers.conf
    # (nginx drops inherited add_header there), so HSTS goes in it too.
    cat "$TEMPLATES/hsts.conf" >>"$KDCUBE_EDGE_DIR/headers.conf"
  else
    fill listen.conf.template "$KDCUBE_EDGE_DIR/server.d/listen.conf"
  fi
  if [ -n "${KDCUBE_PROXYLOGIN_ADDR:-}" ]; then
    fill proxylogin.upstream.conf.template "$KDCUBE_EDGE_DIR/http.d/proxylogin.conf"
    fill proxylogin.location.conf.template "$KDCUBE_EDGE_DIR/server.d/proxylogin.conf"
  fi
  echo "$KDCUBE_EDGE_DIR/nginx.conf"
}

test_config() {
  local dir=${1:-}
  [ -n "$dir" ] || usage
  dir=$(cd "$dir" && pwd)
  local binary
  binary=$(nginx_binary)
  [ -n "$binary" ] || { echo "nginx is not installed: run $0 install" >&2; exit 1; }
  # -e: without it nginx first opens its compiled-in error log, which a user
  # other than root may not write.
  "$binary" -t -p "$dir/" -c "$dir/nginx.conf" -e "$dir/logs/error.log"
}

case ${1:-} in
  install) install_nginx ;;
  render) shift; render "$@" ;;
  test) shift; test_config "$@" ;;
  *) usage ;;
esac
