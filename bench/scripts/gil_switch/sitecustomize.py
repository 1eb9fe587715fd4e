"""Put this folder on PYTHONPATH to give every Python process started with it (a deployment's
Ray workers included) the GIL switch interval PDSERVE_SWITCH_MS (ms; Python's default is 5):

    PYTHONPATH=bench/scripts/gil_switch PDSERVE_SWITCH_MS=0.5 TAG=-sw05 \\
        bash bench/scripts/h200_kv_trace.sh

An experiment's switch, not a setting of pdserve (BENCHMARKS.md: a 0.5 ms interval did not
move the late KV)."""

import os
import sys

if os.environ.get("PDSERVE_SWITCH_MS"):
    sys.setswitchinterval(float(os.environ["PDSERVE_SWITCH_MS"]) / 1e3)
