#!/usr/bin/env bash
# Run the device-side test subset on aarch64 under emulation (qemu-user), as root.
#
#   scripts/arm/test-arm.sh            # or: make test-arm
#
# 1. host tools: debootstrap, qemu-user-static, binfmt-support (apt-get, if missing);
#    registers qemu-aarch64 with binfmt_misc so the chroot's binaries run transparently;
# 2. a Debian arm64 root in $ARM_ROOT (default .arm-root/, git-ignored), built once by
#    debootstrap (--foreign, then the second stage under qemu) with python3, venv, pip;
# 3. a venv in that root with the aarch64 wheels of the device dependencies from PyPI
#    (pyproject's dependencies and its test and litert extras, less anything that pulls torch);
#    rebuilt when that list changes;
# 4. a fresh copy of the project (git-tracked and untracked-but-not-ignored files),
#    installed with `pip install --no-deps` (so no torch, and the package data is checked);
# 5. inside the root: `python -m pytest` over tests/device/, minus any module that still imports a host package
#    (scripts/arm/device_only.py decides and prints what it left out), then `edge devices`
#    from outside the source tree, to show the installed package finds its profiles.
#
# What it proves: the device code imports, runs and gives the tested numbers on aarch64
# Linux with the aarch64 wheels (numpy, onnxruntime's aarch64 MLAS kernels, safetensors).
# What it does not: anything about speed or memory on a real board (qemu-user translates
# every instruction, 10-50x slower), nor execution providers other than CPU.
#
# Environment: ARM_ROOT (cache folder), ARM_SUITE (Debian suite, default: the host's),
# ARM_MIRROR (Debian mirror, default: the host's apt source), ARM_EXTRAS (pyproject extras, default
# test,litert), ARM_EXTRA_PIP (more device packages), PYTEST_ARGS (extra pytest args).
set -euo pipefail

# Everything runs inside main, which bash parses whole before running it: editing this file while it
# runs (the first run takes a while) cannot change what the running copy does.
main() {
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ARM_ROOT="${ARM_ROOT:-$REPO/.arm-root}"
ROOTFS="$ARM_ROOT/rootfs"
DEPS="numpy onnx onnxruntime safetensors pyyaml filelock google-re2 pytest"
START=$(date +%s)

say() { printf 'test-arm [%4ss]: %s\n' "$(( $(date +%s) - START ))" "$*" >&2; }
die() { say "error: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc); run as root or in a disposable VM/container"

# -- 1. host tools and binfmt ------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
    say "installing host tools: ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || die "cannot mount binfmt_misc; this sandbox cannot run foreign binaries transparently"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
fi
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "qemu-aarch64 is registered without the F (fix binary) flag; the chroot could not find qemu"

# -- 2. the arm64 root ---------------------------------------------------------------------
unmount_under() {  # lazily unmount everything mounted below $1 (a half-finished earlier run may leave proc)
    local m
    for m in $(awk -v p="$1/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m" || true; done
}
host_suite() { . /etc/os-release && echo "${VERSION_CODENAME:-bookworm}"; }
host_mirror() {  # first Debian archive URI in the host's apt sources (deb822 or one-line format)
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | head -1 | tr -d ' ' || true
}
SUITE="${ARM_SUITE:-$(host_suite)}"
MIRROR="${ARM_MIRROR:-$(host_mirror)}"
mkdir -p "$ARM_ROOT"
echo '*' >"$ARM_ROOT/.gitignore"   # keep git and ruff out of the root, whatever the repo's .gitignore says
if [ ! -e "$ROOTFS/.edge-rootfs-done" ]; then
    [ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources*; set ARM_MIRROR"
    unmount_under "$ROOTFS"
    if grep -q " $ROOTFS/" /proc/mounts; then die "something is still mounted under $ROOTFS; unmount it first"; fi
    rm -rf "$ROOTFS"
    mkdir -p "$ROOTFS"
    say "debootstrap arm64 $SUITE (first stage)"
    debootstrap --arch=arm64 --variant=minbase --foreign \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" >"$ARM_ROOT/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $ARM_ROOT/debootstrap.log"
    say "debootstrap second stage under qemu-aarch64"
    chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >>"$ARM_ROOT/debootstrap.log" 2>&1 \
        || die "second stage failed; see $ROOTFS/debootstrap/debootstrap.log"
    touch "$ROOTFS/.edge-rootfs-done"
fi

# -- mounts for the chroot, always undone ------------------------------------------------
mounted=()
cleanup() {
    local i
    for (( i=${#mounted[@]}-1; i>=0; i-- )); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
# No sysfs: onnxruntime's cpuinfo reads the host's (x86) CPU details there and segfaults under qemu-user.
# Instead two plain files say "one CPU": without them cpuinfo fails and XNNPACK (LiteRT) turns itself
# off; with the host's count, every session rebuild starts a thread pool whose threads qemu-user keeps
# memory for (tests/test_concurrency.py saw +30 MB per 1,000 switches, none natively). cpuinfo still
# warns "Unknown CPU vendor" once per process: qemu's /proc/cpuinfo is the host's.
mkdir -p "$ROOTFS/sys/devices/system/cpu"
for f in possible present; do echo 0 >"$ROOTFS/sys/devices/system/cpu/$f"; done
for m in proc dev; do
    mountpoint -q "$ROOTFS/$m" && continue
    case "$m" in
        proc) mount -t proc proc "$ROOTFS/proc" ;;
        dev) mount --bind /dev "$ROOTFS/dev" ;;
    esac
    mounted+=("$ROOTFS/$m")
done
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# pip in the root trusts what the host trusts (a TLS-inspecting proxy's CA, say): the host's CA bundle.
CA="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
CA_IN_ROOT=""
if [ -f "$CA" ]; then cp -L "$CA" "$ROOTFS/etc/ssl/certs/edge-host-ca.crt" && CA_IN_ROOT=/etc/ssl/certs/edge-host-ca.crt; fi

in_root() {  # run a shell command inside the arm64 root with a clean environment
    chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PYTHONDONTWRITEBYTECODE=1 \
        ${CA_IN_ROOT:+PIP_CERT=$CA_IN_ROOT} /bin/sh -c "$1"
}

arch="$(in_root 'uname -m; python3 -c "import platform; print(platform.python_version())"' | tr '\n' ' ')"
say "root: $ROOTFS ($arch)"
case "$arch" in aarch64*) ;; *) die "the root does not run as aarch64 (uname -m: $arch)";; esac

# -- 3. the project and its device dependencies (aarch64 wheels) -------------------------------
say "copying the project (tracked and untracked, not ignored, files)"
rm -rf "$ROOTFS/src"
mkdir -p "$ROOTFS/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$ROOTFS/src" -xf -

# The requirements are read from pyproject.toml: [project] dependencies plus the extras in ARM_EXTRAS
# (default: test,litert), never "host", and never a package that pulls torch (requirements.py drops
# and names them); ARM_EXTRA_PIP adds device packages pyproject does not declare.
EXTRAS="${ARM_EXTRAS:-test,litert}"
EXTRA_PIP="${ARM_EXTRA_PIP:-}"
in_root "python3 /src/scripts/arm/requirements.py '$EXTRAS' >/src/.arm-requirements.txt" || die "bad ARM_EXTRAS"
key="$(tr '\n' ' ' <"$ROOTFS/src/.arm-requirements.txt")$EXTRA_PIP"
if [ "$(cat "$ROOTFS/opt/venv/.edge-deps" 2>/dev/null)" != "$key" ]; then
    say "venv + pip install (aarch64 wheels only): $key"
    in_root "rm -rf /opt/venv && python3 -m venv /opt/venv \
             && pip install -q --only-binary=:all: -r /src/.arm-requirements.txt $EXTRA_PIP" \
        || die "pip install in the arm64 root failed"
    echo "$key" >"$ROOTFS/opt/venv/.edge-deps"
fi
in_root 'python -c "import numpy, onnx, onnxruntime, platform; print(\"  numpy\", numpy.__version__, \"onnx\", onnx.__version__, \"onnxruntime\", onnxruntime.__version__, onnxruntime.get_available_providers(), platform.machine())"' >&2 \
    || die "the device dependencies do not import in the arm64 root"

# -- 4. the project itself, without torch ------------------------------------------------------
say "installing the project (pip install --no-deps)"
in_root 'cd /src && pip install -q --no-deps --force-reinstall . && python -c "import edge"' \
    || die "installing the project in the arm64 root failed"
in_root 'python -c "import torch"' 2>/dev/null && die "torch is importable in the arm64 root; the device install must not have it"

# -- 5. the tests ---------------------------------------------------------------------------------
say "pytest (device-side subset) under qemu-aarch64"
rc=0
in_root "cd /src && PYTHONPATH=/src/scripts/arm python -m pytest -q -p device_only -p no:cacheprovider tests/device ${PYTEST_ARGS:-}" || rc=$?
say "edge devices (the installed package, run from /, must find its shipped profiles)"
in_root 'cd / && edge devices && python /src/scripts/arm/check_installed.py' || rc=$?
say "done (exit $rc)"
exit $rc
}

main "$@"
