#!/usr/bin/env bash
# Run loraflow's GPU tests on a machine without network (see ../shared/gpu/README.md):
# the wheel bundle in .whl/ supplies bitsandbytes, prefect, datasets and pydantic.
#   tests/gpu/run_on_device.sh OUTDIR [pytest args, default: every GPU test]
# Writes OUTDIR/machine.txt (GPU, driver, versions), OUTDIR/results.jsonl (one line per
# measurement) and OUTDIR/pytest.log.
set -o pipefail
out=${1:?OUTDIR}; shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PREFECT_HOME=/tmp/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
export LORAFLOW_GPU_RESULTS=$out PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'PY'
import platform, importlib.metadata as m
print("python", platform.python_version(), platform.platform())
for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub",
          "datasets", "prefect", "safetensors"):
    print(p, m.version(p))
PY
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
if [ $# -eq 0 ]; then
  set -- tests/gpu/test_gpu_loading.py tests/gpu/test_gpu_training.py tests/gpu/test_gpu_flow.py \
    tests/gpu/test_gpu_methods.py tests/gpu/test_gpu_levers.py
fi
python3 -m pytest -p no:cacheprovider -v -rA "$@" 2>&1 | tee "$out/pytest.log"
