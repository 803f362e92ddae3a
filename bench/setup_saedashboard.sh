#!/usr/bin/env bash
# A separate venv for SAEDashboard (it needs other transformer-lens/transformers versions).
# Usage: bench/setup_saedashboard.sh [VENV]  -> prints the python to pass as --saedashboard
set -euo pipefail
VENV=${1:-.bench-saedashboard}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import sae_dashboard.sae_vis_runner' 2>/dev/null; then
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $TORCH_SPEC >&2
  # its numpy 1.x pin needs a pyarrow built for numpy 1.x
  "$VENV/bin/pip" install -q sae-dashboard "pyarrow<18" >&2
fi
echo "$VENV/bin/python"
