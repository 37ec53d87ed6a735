#!/usr/bin/env bash
# The browser the UI tests (tests/browser/) drive through Playwright.
#
#   ops/ui/chromium.sh install
#       Install Debian's chromium when /usr/bin/chromium is missing.
#
# Playwright is told to use this binary (executable_path); its own browser
# download is never used, since the machines that run the tests reach only
# package registries. Fonts come along as chromium's dependencies, so pages
# render with real glyphs in screenshots.
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# shellcheck source=ops/lib.sh
source "$(dirname "$0")/../lib.sh"

CHROMIUM=/usr/bin/chromium

install_chromium() {
  if [ -x "$CHROMIUM" ]; then
    echo "chromium already installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
    return 0
  fi

  apt_install chromium
  echo "installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
}

case ${1:-} in
  install) install_chromium ;;
  *) usage ;;
esac
