#!/usr/bin/env bash
# Browser bits for the tier-4 tests (tests/tier4/test_browser.py): Debian's Chromium and
# ChromeDriver (apt, only when /usr/bin/chromium is missing) and the pinned npm package
# playwright-core (tests/browser/package.json + package-lock.json, installed with `npm ci`
# into the ignored folder .host/browser/node_modules). Playwright's own browser download
# is never used: the tests launch /usr/bin/chromium. Idempotent: a repeated run checks the
# binary and a stamp (hash of the lock file) and exits in well under a second.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="$root/.host/browser"
stamp="$dest/.stamp"
chromium=${INFSPLIGN_CHROMIUM:-/usr/bin/chromium}
want=$(cat "$root/tests/browser/package.json" "$root/tests/browser/package-lock.json" | sha256sum | cut -c1-16)

step() { printf '[browser] %s\n' "$*"; }

if [[ -x "$chromium" && -f "$stamp" && "$(cat "$stamp")" == "$want" \
      && -f "$dest/node_modules/playwright-core/package.json" ]]; then
    exit 0
fi

t0=$SECONDS
as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo -n "$@"
    else
        echo "[browser] need root for: $* (run it as root, or install it yourself)" >&2
        return 1
    fi
}

apt_packages=()
[[ -x "$chromium" ]] || apt_packages+=(chromium chromium-driver)
command -v npm >/dev/null || apt_packages+=(nodejs npm)
if ((${#apt_packages[@]})); then
    step "installing Debian packages: ${apt_packages[*]} (first time: about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
[[ -x "$chromium" ]] || { echo "[browser] $chromium still missing after apt-get" >&2; exit 1; }
step "$("$chromium" --version 2>/dev/null || echo "chromium at $chromium")"

if [[ ! ( -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$dest/node_modules/playwright-core/package.json" ) ]]; then
    step "installing playwright-core (pinned, tests/browser/package-lock.json) into $dest"
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    cp "$root/tests/browser/package.json" "$root/tests/browser/package-lock.json" "$dest.tmp/"
    # --ignore-scripts: playwright-core has no install script, and no browser download is wanted.
    (cd "$dest.tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    echo "$want" > "$stamp"
fi
step "ready in $((SECONDS - t0)) s"
