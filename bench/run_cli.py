"""`loraflow ...` as a new process that also says, on its last stderr line, which heavy
libraries it imported: `HEAVY_IMPORTS ["torch", ...]` (a cached run must list none)."""
import atexit
import json
import runpy
import sys
from pathlib import Path

# This checkout's loraflow, not whatever an editable install points at.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEAVY = ("torch", "transformers", "peft", "datasets", "bitsandbytes", "accelerate", "safetensors")


def _report() -> None:
    print("HEAVY_IMPORTS " + json.dumps(sorted(m for m in HEAVY if m in sys.modules)),
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    atexit.register(_report)
    sys.argv = ["loraflow"] + sys.argv[1:]
    runpy.run_module("flows.cli", run_name="__main__")
