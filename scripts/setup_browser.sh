#!/usr/bin/env bash
# A real headless browser for the frontend tests: Debian's Chromium (/usr/bin/chromium), driven by the
# Playwright Python package (requirements-test.txt) through its executable_path; Playwright's own browser
# download is never used (it needs the internet). Installs with apt-get when run as root and Chromium is
# missing; otherwise says what to do. Safe to run repeatedly (a no-op once Chromium is there).
set -euo pipefail

say() { echo "[setup_browser] $*"; }
if command -v chromium >/dev/null 2>&1; then
  say "chromium present: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's chromium (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  say "installed: $(chromium --version 2>/dev/null | head -1)"
else
  say "no chromium and no root apt-get: install Chromium (e.g. 'sudo apt-get install chromium') for the browser tests"
fi
