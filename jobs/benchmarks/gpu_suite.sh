#!/usr/bin/env bash
# Every GPU benchmark as one command, for the day a GPU machine is lent (the device tool's `run`: one call,
# meant to finish in under 8 minutes on one H100/H200). Writes one JSON, $OUT/gpu_suite.json (OUT defaults
# to runs/benchmarks), with each benchmark's own JSON, exit status and seconds inside.
#
#   bash jobs/benchmarks/gpu_suite.sh                       # on the GPU machine
#   GPU_SUITE_DEVICE=cpu bash jobs/benchmarks/gpu_suite.sh  # the same steps at toy sizes on a CPU (tested)
#
# The GPU machine's image has torch, transformers, peft, timm, torchvision and pyarrow, but not diffusers,
# ray or torch-fidelity: carry their wheels (and any other missing one) in runs/wheels/ and they are
# installed first. Ray is not there, so the stage classes run directly (plain loops, Text2Img/Img2Img in
# one process); Ray's overhead over those loops is measured on the CPU (finetune_throughput.py and
# generate_throughput.py without --device cuda). Serving (Ray Serve) is not in the suite for that reason.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/benchmarks}
DEVICE=${GPU_SUITE_DEVICE:-cuda}
LIMIT=${GPU_SUITE_LIMIT_S:-170}  # seconds per benchmark, at most
work="$OUT/gpu_suite"
mkdir -p "$work"
PY=${PYTHON:-python}

if compgen -G "runs/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index runs/wheels/*.whl || echo "gpu_suite: some wheels did not install"
fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "diffusers", "transformers", "peft", "safetensors", "pydantic", "yaml", "PIL", "numpy",
        "pyarrow", "scipy", "torch_fidelity", "timm"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
[ -n "$missing" ] && echo "gpu_suite: missing modules (carry their wheels in runs/wheels/): $missing"
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || { echo "gpu_suite: no CUDA device"; exit 2; }
  FT=(--device cuda --preset sd15-shape --resolution 512 --batch-size 4 --mixed-precision bf16 --steps 40 --warmup 10)
  GEN=(--gpu-recipe --device cuda --images 32 --batch-size 16)
  EVAL=(--device cuda --real-per-class 100 --syn-per-class 100 --size 256 --repeats 1 --skip-classifier)
else  # the same steps at toy sizes, so that a CPU run proves the suite itself
  FT=(--device cpu --preset tiny --resolution 32 --batch-size 2 --mixed-precision no --steps 6 --warmup 2)
  GEN=(--gpu-recipe --device cpu --preset tiny --dtype float32 --images 4 --batch-size 2 --size 32 --steps 2
       --refine-steps 4 --no-compile)
  EVAL=(--device cpu --real-per-class 10 --syn-per-class 4 --size 64 --repeats 1 --skip-classifier)
fi

results=()
run() {  # name, script, args...: the benchmark under a time limit; its JSON goes to $work/<name>.json
  local name=$1 script=$2; shift 2
  local t0=$SECONDS
  echo "gpu_suite: $name ..."
  timeout "$LIMIT" "$PY" "$script" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  echo "gpu_suite: $name exit $rc in $((SECONDS - t0)) s (log: $work/$name.log)"
  results+=("$name:$rc:$((SECONDS - t0))")
}
# fine-tuning sd15-shape 512 px bf16, with and without gradient checkpointing and cached latents (plain loop:
# no Ray here)
run finetune jobs/benchmarks/finetune_throughput.py "${FT[@]}" --gradient-checkpointing off on \
  --cache-latents off on --workers 0 --repeats 1 --out "$work/finetune.json"
# generation: the paper's way (batch 1, fp16) against busdiff's best (batched, bf16, compiled, latent hand-off)
run generate jobs/benchmarks/generate_throughput.py "${GEN[@]}" --json "$work/generate.json"
# evaluation: Inception features/s, cold and from the cache, and a whole evaluation twice
run evaluate jobs/benchmarks/evaluate_throughput.py "${EVAL[@]}" --out "$work/evaluate.json"

"$PY" - "$work" "$OUT/gpu_suite.json" "$DEVICE" "${results[@]}" <<'EOF'
import json, platform, sys
from pathlib import Path
work, out, device, *runs = sys.argv[1:]
doc = {"suite": "gpu_suite", "device": device, "platform": platform.platform(), "benchmarks": {}}
try:
    import torch
    doc["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as e:  # noqa: BLE001 - recorded, not fatal
    doc["gpu"] = f"unknown: {e}"
for item in runs:
    name, rc, seconds = item.split(":")
    path = Path(work) / f"{name}.json"
    doc["benchmarks"][name] = {
        "exit": int(rc), "seconds": int(seconds),
        "result": json.loads(path.read_text()) if int(rc) == 0 and path.is_file() else None,
        "log_tail": (Path(work) / f"{name}.log").read_text()[-1500:],
    }
Path(out).write_text(json.dumps(doc, indent=2) + "\n")
failed = [k for k, v in doc["benchmarks"].items() if v["exit"] != 0]
print(f"gpu_suite: wrote {out}; failed: {', '.join(failed) or 'none'}")
sys.exit(1 if failed else 0)
EOF
