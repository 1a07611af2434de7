#!/usr/bin/env bash
# The GPU benchmark in one step: SD2's UNet and text encoder (random weights, nothing downloaded)
# through rlds' sampler and learner code on this machine's GPU. Writes $OUT/gpu_bench.json
# (rewritten after every phase, so a run cut short still leaves its numbers) and $OUT/gpu_bench.log.
#
#   cluster/gpu_bench.sh                       # defaults: batch 8, 50 DDIM steps, no torch.compile
#   OUT=/tmp/bench cluster/gpu_bench.sh --compile --batch-size 16
#
# Extra arguments go to `python -m rlds.bench.gpu` (--batch-size, --steps, --compile, --reps,
# --time-budget, --no-vae, --peak-tflops). Python: the repository's .venv if it has what rlds needs,
# else a python3 that has torch, diffusers and transformers (with this checkout on PYTHONPATH; Ray
# is not needed), else wheels in .whl/ installed offline to /tmp/site, else a new .venv from
# requirements.txt (needs PyPI).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
OUT=${OUT:-$root/runs/bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

have_deps() { "$1" -c 'import torch, diffusers, transformers, yaml, numpy' 2>/dev/null; }

py=""
if [[ -x .venv/bin/python ]] && have_deps .venv/bin/python; then
  py=.venv/bin/python
elif command -v python3 >/dev/null && have_deps python3; then
  py=python3
  export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
elif compgen -G ".whl/*.whl" >/dev/null && command -v python3 >/dev/null; then
  echo "gpu_bench.sh: installing the wheels in .whl/ to /tmp/site (offline)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_bench.sh: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}
  py=python3
  have_deps "$py" || { echo "gpu_bench.sh: still missing torch/diffusers/transformers/yaml after .whl/" >&2; exit 2; }
else
  echo "gpu_bench.sh: setting up .venv from requirements.txt (needs PyPI)"
  { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e .; } || {
    echo "gpu_bench.sh: could not build .venv; on a machine without PyPI, put the missing wheels" \
         "(e.g. diffusers and importlib_metadata) in .whl/ and run again" >&2
    exit 2
  }
  py=.venv/bin/python
fi

"$py" - <<'PY' 2>&1 | tee "$OUT/gpu_env.txt"
import sys, torch, diffusers, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__)
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")
PY
command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/gpu_env.txt" 2>&1

# The benchmark keeps to its own --time-budget (default 420 s); this is the hard stop behind it.
timeout 480 "$py" -m rlds.bench.gpu --out "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
rc=${PIPESTATUS[0]}
if ((rc == 124)); then
  echo "gpu_bench.sh: stopped by the 480 s timeout; $OUT/gpu_bench.json holds the phases that finished" >&2
fi
exit "$rc"
