# shellcheck shell=bash
# Helpers shared by the soft-roce-setup scripts: messages, root access, package installs.
# Sourced, never run. The caller sets `set -euo pipefail` and defines nothing these use.

# The name of the running script, for messages.
prog=$(basename "$0")

say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit "${DIE_STATUS:-1}"
}

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for '$*' and sudo is not installed; run this script as root"
    fi
}

# Installs Debian/Ubuntu packages that are not installed yet. Packages are given as
# "test:package" pairs, where test is a command name or an absolute path that the package
# provides, or empty (":package") to ask dpkg whether the package itself is installed; only the
# missing ones are installed, without recommends.
install_missing() {
    local want=() pair test pkg
    for pair in "$@"; do
        test=${pair%%:*}
        pkg=${pair#*:}
        if [ -z "$test" ]; then
            dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' && continue
        elif [ "${test#/}" != "$test" ]; then
            [ -e "$test" ] && continue
        elif command -v "$test" >/dev/null 2>&1; then
            continue
        fi
        want+=("$pkg")
    done
    [ "${#want[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages: ${want[*]}; this is not a Debian/Ubuntu host, install them by hand"
    say "installing ${want[*]}"
    # Package lists may be stale or absent on a fresh machine: refresh once, then install.
    as_root apt-get update -qq >/dev/null ||
        die "apt-get update failed; check the network or the apt sources"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${want[@]}" >/dev/null ||
        die "apt-get install ${want[*]} failed"
}

# The host's multiarch library directory, e.g. /usr/lib/x86_64-linux-gnu.
multiarch_libdir() {
    local triplet
    triplet=$(gcc -print-multiarch 2>/dev/null || true)
    [ -n "$triplet" ] || triplet="$(uname -m)-linux-gnu"
    printf '/usr/lib/%s\n' "$triplet"
}

# The memlock limit of this shell in KiB, or "unlimited".
memlock_limit() { ulimit -l; }
