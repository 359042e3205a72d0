//go:build tools

// Prometheus's promtool pinned for hoptrace's rule-file test (promtool check rules
// deploy/prometheus/hoptrace-rules.yml); built by scripts/go-tools.sh.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
