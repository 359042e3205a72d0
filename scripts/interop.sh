#!/usr/bin/env bash
# Build hoptrace's interop services once and reuse them afterwards (tests/interop runs them).
#
#   scripts/interop.sh             build every service that is missing or out of date
#   scripts/interop.sh node        only the named ones (node, java)
#
# node: interop/node/node_modules by `npm ci` from the committed package-lock.json
#       (--prefer-offline: the npm cache serves it once it has been fetched).
# java: interop/java/target by `mvn package`: the consumer jar, its libraries in target/lib and,
#       through the pom's dependency:copy execution, the OpenTelemetry Java agent in
#       target/agent/opentelemetry-javaagent.jar. Maven tries offline (~/.m2) first.
#
# Both folders are ignored by git. A service is rebuilt only when its stamp (hash of its inputs
# and toolchain versions) changed, so a second run is a no-op. Prints what it built, what it
# reused, and how long each build took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL=(node java)

node_stamp() {
  local dir="$ROOT/interop/node"
  { node --version; npm --version; cat "$dir/package.json" "$dir/package-lock.json"; } | sha256sum | cut -d' ' -f1
}

java_stamp() {
  local dir="$ROOT/interop/java"
  { java -version 2>&1; mvn -B --version 2>/dev/null | head -1; cat "$dir/pom.xml"
    find "$dir/src" -type f -print0 | sort -z | xargs -0r cat; } | sha256sum | cut -d' ' -f1
}

need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "interop: $tool is not installed" >&2; exit 1; }
  done
}

ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

# Debian's Maven prints colour resets even with -B -q: drop escape sequences from its output.
mvn_quiet() { mvn -B -q "$@" 2>&1 | sed 's/\x1b\[[0-9;]*m//g'; }

build_node() {
  local dir="$ROOT/interop/node" stamp stamp_file t0
  need node npm
  stamp="$(node_stamp)"
  stamp_file="$dir/node_modules/.hoptrace-interop.stamp"
  if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
    echo "interop: node up to date ($dir/node_modules), reused"
    return 0
  fi
  echo "interop: installing node (npm ci in interop/node) ..."
  t0=$(date +%s%N)
  (cd "$dir" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
  echo "$stamp" >"$stamp_file"
  echo "interop: installed node -> $dir/node_modules in $(ms_since "$t0") ms"
}

build_java() {
  local dir="$ROOT/interop/java" stamp stamp_file t0 offline_log
  need java javac mvn
  stamp="$(java_stamp)"
  stamp_file="$dir/target/.hoptrace-interop.stamp"
  if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" && -f "$dir/target/session-consumer.jar" \
    && -f "$dir/target/agent/opentelemetry-javaagent.jar" ]]; then
    echo "interop: java up to date ($dir/target), reused"
    return 0
  fi
  echo "interop: building java (mvn package in interop/java) ..."
  t0=$(date +%s%N)
  offline_log="$(mktemp)"
  if ! (cd "$dir" && mvn_quiet -o package) >"$offline_log"; then
    echo "interop: java: not everything is in the local Maven repository, building online"
    (cd "$dir" && mvn_quiet package)
  fi
  rm -f "$offline_log"
  echo "$stamp" >"$stamp_file"
  echo "interop: built java -> $dir/target (session-consumer.jar, lib/, agent/) in $(ms_since "$t0") ms"
}

services=("$@")
[[ ${#services[@]} -gt 0 ]] || services=("${ALL[@]}")
for s in "${services[@]}"; do
  case "$s" in
    node) build_node ;;
    java) build_java ;;
    *) echo "interop: unknown service: $s (known: ${ALL[*]})" >&2; exit 2 ;;
  esac
done
