"""Does the attention backend explain the 8B baseline gap (issue #7)? The shared baseline
(bench/baseline_peft.py, unchanged) at 8B bf16, bs 4, checkpointing, under each SDPA
backend torch offers; prints the flags torch starts with, then one JSON line per backend.

usage (GPU machine, repo root, wheel bundle installed):  python3 bench/sdpa_backends.py
"""
import json
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baseline_peft  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

print(json.dumps({"cudnn": torch.backends.cudnn.version(), "torch": torch.__version__,
                  "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
                  "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
                  "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled()}),
      flush=True)
for name, backends in [("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]),
                       ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                       ("cudnn", [SDPBackend.CUDNN_ATTENTION])]:
    print(json.dumps({"backend": name}), flush=True)
    try:
        with sdpa_kernel(backends) if backends else nullcontext():
            baseline_peft.run("llama-8b", False, 2048, 4, True, False, steps=5, warm=2)
    except RuntimeError as exc:  # a backend without a kernel for these shapes
        print(json.dumps({"backend": name, "error": repr(exc)[:300]}), flush=True)
