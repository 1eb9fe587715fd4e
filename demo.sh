#!/usr/bin/env bash
# The main job (README: "Run it"): install into .venv if needed, then `pdserve demo` — a local
# Ray, the tiny model (made on first use), one prefill + one decode replica, streamed requests.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/pdserve ] || bash .ci/install
exec .venv/bin/pdserve demo "$@"
