#!/bin/sh
# Install the CNCF distribution registry (Debian/Ubuntu package docker-registry) used by the fleet tests.
# Idempotent. The tests run their own registry on 127.0.0.1, never the system service.
# Exits 0 even when it cannot install (the fleet tests then skip and say why).
set -u

have() { command -v docker-registry >/dev/null 2>&1 || command -v registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ]; }

if have; then
    echo "install-registry: registry binary present ($(command -v docker-registry || command -v registry || echo /usr/bin/docker-registry))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-registry: no apt-get here; install the CNCF distribution registry by hand to run the fleet tests (they skip)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-registry: not root and no passwordless sudo; run 'sudo apt-get install docker-registry' to run the fleet tests (they skip)"
        exit 0
    fi
fi
was_active=no
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then was_active=yes; fi
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 \
    && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null 2>&1 \
    && have; then
    # The package enables a system service on :5000 (all interfaces); the tests do not use it, so if the
    # install started it, stop and disable it again.
    if [ "$was_active" = no ] && command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
        $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
        echo "install-registry: installed docker-registry; stopped and disabled the service the package started"
    else
        echo "install-registry: installed docker-registry ($(command -v docker-registry || echo /usr/bin/docker-registry))"
    fi
else
    echo "install-registry: apt-get could not install docker-registry (offline mirror or package missing); the fleet tests skip"
fi
exit 0
