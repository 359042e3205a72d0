#!/usr/bin/env bash
# `make demo`: the whole reference pipeline on the local stack, a few healthy payments, one
# payment that hits the incident's fault (admin-service reports success but writes nothing, and
# allocation-worker in legacy mode marks it processed anyway), and how to look each one up.
set -euo pipefail
cd "$(dirname "$0")/.."
H="${HOPTRACE_BIN:-.venv/bin/hoptrace}"

say() { printf '\n== %s\n' "$*"; }
pay() { "$H" pay --student "$1" --course "$2" --amount "$3" | tail -n 1; }

say "starting the local stack: PostgreSQL, Kafka, Jaeger (when built), collector, services (hoptrace dev up)"
"$H" dev up
"$H" topics ensure
# Jaeger runs when scripts/go-tools.sh built it: `hoptrace trace` links to it once this is set
if { "$H" dev status || true; } | grep -q "^jaeger  *up"; then
  export HOPTRACE_JAEGER_URL="${HOPTRACE_JAEGER_URL:-http://127.0.0.1:16686}"
fi

say "healthy payments"
ok=()
for i in 1 2 3; do
  id=$(pay "student-$i" "course-$i" "$((40 + i)).00")
  ok+=("$id")
  echo "payment $id"
done

say "fault: admin-service silent-no-write + allocation-worker no-verify (the original incident)"
"$H" dev start admin-service --fault silent-no-write
"$H" dev start allocation-worker --fault no-verify
bad=$(pay student-42 course-7 99.00)
echo "payment $bad"
sleep 3  # let it travel: allocation-worker marks it processed although no trainer row exists
echo "restoring admin-service and allocation-worker (the faulty payment stays as evidence)"
"$H" dev stop admin-service >/dev/null && "$H" dev start admin-service
"$H" dev stop allocation-worker >/dev/null && "$H" dev start allocation-worker

say "fault: session-worker stopped (the payment stalls at session.created)"
"$H" dev stop session-worker
stalled=$(pay student-43 course-8 59.00)
echo "payment $stalled"
sleep 2

echo "session-worker left stopped: \`hoptrace dev start session-worker\` lets the stalled payment finish"

say "look each payment up"
for id in "${ok[@]}"; do echo "  hoptrace trace $id        # healthy"; done
echo "  hoptrace trace $bad        # marked processed, no trainer_allocations row"
echo "  hoptrace trace $stalled        # stalled: session-worker not running"
echo "  hoptrace stalls                # every stalled payment"
echo "  dashboard: http://127.0.0.1:8501"
if [[ -n "${HOPTRACE_JAEGER_URL:-}" ]]; then
  echo "  jaeger:    $HOPTRACE_JAEGER_URL (export HOPTRACE_JAEGER_URL=$HOPTRACE_JAEGER_URL: links in hoptrace trace)"
else
  echo "  (no Jaeger: \`scripts/go-tools.sh jaeger\` builds it, then \`hoptrace dev up\` starts it)"
fi
