# Sourced by scripts/run, scripts/test and .ci/run: install what loopvol and its tests drive, so
# both README commands work on a fresh Debian/Ubuntu machine with nothing installed by hand.

# The programs the node side runs (mkfs, fsck, grow, blkid), by Debian package.
LOOPVOL_RUNTIME_PACKAGES=(e2fsprogs xfsprogs btrfs-progs util-linux mount)
# The tests also drive fio (benchmarks, IO checks), and the benchmark's cross-node floor
# sends bytes with socat; network namespaces need ip (iproute2).
LOOPVOL_TEST_PACKAGES=("${LOOPVOL_RUNTIME_PACKAGES[@]}" fio socat iproute2)

# ensure_packages PKG...: apt-get install the ones that are missing (root only).
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "loopvol needs these packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    return 1
  fi
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_loop: loop devices come from the loop module (built in on most kernels).
ensure_loop() {
  [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
}

# ensure_interop_python: a venv with the pinned grpcio the interop test drives loopvol with;
# exports LOOPVOL_PYTHON for the tests.
ensure_interop_python() {
  local venv=target/interop-venv req=tests/interop/requirements.txt
  if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
      rm -rf "$venv"
      ensure_packages python3-venv python3-pip
      python3 -m venv "$venv"
    fi
  fi
  # Reinstall only when the pins changed since the last install.
  if ! cmp -s "$req" "$venv/requirements.installed"; then
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
    cp "$req" "$venv/requirements.installed"
  fi
  export LOOPVOL_PYTHON="$PWD/$venv/bin/python"
}
