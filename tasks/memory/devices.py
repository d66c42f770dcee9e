"""The machine's GPUs (nvidia-smi) and RAM: the one device inventory."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional

from tasks.contracts import Gpu

_NVIDIA_SMI_QUERY = ["--query-gpu=index,uuid,name,memory.total,memory.free,compute_cap",
                     "--format=csv,noheader,nounits"]


def visible_gpus(run: Callable = subprocess.run, env: Optional[dict] = None) -> list[Gpu]:
    """The GPUs this process can use, as NVML reports them through nvidia-smi.

    Respects CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs; empty or -1: none), renumbering
    the visible ones from 0 as CUDA does. No nvidia-smi, or an error: no GPUs.
    """
    env = os.environ if env is None else env
    if shutil.which("nvidia-smi") is None and run is subprocess.run:
        return []
    try:
        proc = run(["nvidia-smi", *_NVIDIA_SMI_QUERY], capture_output=True, text=True,
                   timeout=15)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    rows = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        index, uuid, name, total, free, cap = parts[:6]
        try:
            capability = float(cap)
        except ValueError:
            capability = None  # unknown: bf16 assumed, FP8 not
        rows.append((int(index), uuid, name, int(float(total)) * 2**20,
                     int(float(free)) * 2**20, (capability or 8.0) >= 8.0, capability))
    wanted = env.get("CUDA_VISIBLE_DEVICES")
    if wanted is not None:
        order = [w.strip() for w in wanted.split(",") if w.strip()]
        picked = []
        for w in order:
            if w == "-1":
                break
            match = [r for r in rows if str(r[0]) == w or r[1] == w or r[1].startswith(w)]
            if not match:
                break  # CUDA stops at the first invalid entry
            picked.append(match[0])
        rows = picked
    return [Gpu(index=i, name=r[2], total_bytes=r[3], free_bytes=r[4], bf16=r[5],
                compute_capability=r[6]) for i, r in enumerate(rows)]


def available_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parse_size(size) -> int:
    """accelerate-style size (20GiB, 500MB, 1024) → bytes."""
    if isinstance(size, int):
        return size
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(size)
    power = " KMGT".index(m[2].upper() or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)
