#!/usr/bin/env bash
# Installs the system packages the local stack needs, only when they are missing:
# PostgreSQL (Debian's package), a JDK and Maven (the Kafka broker jars, the Java interop
# consumer), Node.js and npm (the Node.js interop worker),
# Chromium (the dashboard's browser test). Safe to run again; prints what it did.
set -euo pipefail

need=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || need+=(postgresql)
# a JDK: the Kafka broker runs on it, the Java interop consumer is compiled with it
command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
# Node.js and npm: the Node.js interop worker (tests/interop)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [[ "${HOPTRACE_SKIP_BROWSER:-0}" != "1" ]]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  dpkg -s fonts-noto-color-emoji >/dev/null 2>&1 || need+=(fonts-noto-color-emoji)
fi

if [[ ${#need[@]} -eq 0 ]]; then
  echo "bootstrap: system packages present (postgresql, a JDK, maven, node, npm, chromium, emoji font)"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  SUDO=sudo
  command -v sudo >/dev/null 2>&1 || { echo "bootstrap: missing ${need[*]}; install them (as root: apt-get install ${need[*]})" >&2; exit 1; }
else
  SUDO=
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: missing ${need[*]} and no apt-get here; install them with your package manager" >&2
  exit 1
fi
echo "bootstrap: installing ${need[*]} (Debian packages)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's postgresql package starts a system cluster on 5432; hoptrace runs its own private one.
echo "bootstrap: done"
