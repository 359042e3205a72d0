#!/usr/bin/env bash
# Build hoptrace's Go tools once and cache them in .hoptrace/tools/bin (GOBIN).
#
#   scripts/go-tools.sh            build every tool that is missing or out of date
#   scripts/go-tools.sh jaeger     build only the named tools (composecheck, dockerfilecheck, otelcol, jaeger, alertmanager, promtool)
#
# Each tool is a Go module under tools/<name>/ (go.mod + go.sum pin every version). A tool is
# rebuilt only when its stamp (hash of its module files + the Go version) changed, so a second
# run is a no-op. Prints what it built, what it reused, and how long each build took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${HOPTRACE_TOOLS_BIN:-$ROOT/.hoptrace/tools/bin}"
ALL_TOOLS=(composecheck dockerfilecheck otelcol jaeger alertmanager promtool)

# tool name -> package to install from inside tools/<name>/
pkg_of() {
  case "$1" in
    jaeger) echo "github.com/jaegertracing/jaeger/cmd/jaeger" ;;
    alertmanager) echo "github.com/prometheus/alertmanager/cmd/alertmanager" ;;
    promtool) echo "github.com/prometheus/prometheus/cmd/promtool" ;;
    composecheck | dockerfilecheck | otelcol) echo "." ;;
    *) echo "unknown tool: $1 (known: ${ALL_TOOLS[*]})" >&2; return 2 ;;
  esac
}

stamp_of() {
  local dir="$ROOT/tools/$1"
  { go env GOVERSION; cat "$dir"/go.mod "$dir"/go.sum; find "$dir" -name '*.go' -print0 | sort -z | xargs -0r cat; } \
    | sha256sum | cut -d' ' -f1
}

build_one() {
  local name="$1" pkg stamp stamp_file t0 t1
  pkg="$(pkg_of "$name")"
  stamp="$(stamp_of "$name")"
  stamp_file="$BIN/.$name.stamp"
  if [[ -x "$BIN/$name" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
    echo "go-tools: $name up to date ($BIN/$name), reused"
    return 0
  fi
  echo "go-tools: building $name ($pkg in tools/$name) ..."
  t0=$(date +%s)
  (cd "$ROOT/tools/$name" && GOBIN="$BIN" GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false" \
    go install -trimpath -ldflags='-s -w' "$pkg")
  t1=$(date +%s)
  echo "$stamp" >"$stamp_file"
  echo "go-tools: built $name -> $BIN/$name in $((t1 - t0))s"
}

command -v go >/dev/null || { echo "go-tools: the go command is not installed" >&2; exit 1; }
mkdir -p "$BIN"
tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=("${ALL_TOOLS[@]}")
for t in "${tools[@]}"; do
  pkg_of "$t" >/dev/null
  build_one "$t"
done
