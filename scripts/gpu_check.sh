#!/usr/bin/env bash
# One command for a lent GPU (H100/H200; torch, triton and timm preinstalled, no internet), in about 8 minutes:
#   pytest -m gpu; poa bench kernels; poa bench attention; poa bench engines on 1 GPU (ViT-B and ViT-L, none and
#   fsdp); a 30-step ViT-L POA step benchmark at batch 50 (img/s, MFU, phase times, max_memory_allocated next to
#   poa estimate memory's prediction).  Every JSON goes to benchmarks/results/ (or --out).
#
#   bash scripts/gpu_check.sh             # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run   # on a CPU: the same commands at tiny sizes, in well under a minute or two
#
# Wheels the machine lacks (omegaconf + antlr4-python3-runtime, which poa_hpc needs; pytest; xformers; ...) can be
# carried in ./.whl/ and are installed from there with pip --no-index.  What is still missing (xformers, DALI,
# DeepSpeed) is reported and its part skipped; no part stops the others.  Exit code: 0 when every part that could
# run passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=0
OUT=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option '$1' (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY="${POA_PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${POA_PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
declare -a SUMMARY=()
FAILED=0
say() { echo "[gpu_check] $*"; }

# part NAME LIMIT_S CMD...: run one part with a time limit; record passed / failed / skipped.
part() {
  local name="$1" limit="$2"; shift 2
  say "---- $name"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then SUMMARY+=("passed   $name (${dt}s)")
  elif [ $rc -eq 124 ]; then SUMMARY+=("TIMEOUT  $name (${limit}s)"); FAILED=1
  else SUMMARY+=("FAILED   $name (exit $rc, ${dt}s)"); FAILED=1
  fi
}
skip() { say "---- $1: skipped ($2)"; SUMMARY+=("skipped  $1 ($2)"); }

# ------------------------------------------------------------------ environment
if ls .whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  "$PY" -m pip install --quiet --no-index --find-links .whl .whl/*.whl || say "some carried wheels did not install"
fi
if ! "$PY" -c "import poa_hpc.kernels, poa_hpc.configs" 2>/dev/null; then
  say "installing poa_hpc itself (editable, offline)"
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
    || { say "poa_hpc cannot be installed here; stopping"; exit 2; }
fi
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
  say "omegaconf is missing (poa_hpc's configs need it): carry omegaconf and antlr4-python3-runtime wheels in .whl/"
  exit 2
fi
"$PY" - <<'EOF'
import importlib, platform
import torch
print(f"[gpu_check] python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)'}")
for mod in ("triton", "timm", "xformers", "deepspeed", "nvidia.dali", "pytest"):
    try:
        m = importlib.import_module(mod)
        print(f"[gpu_check]   {mod:<12} {getattr(m, '__version__', 'present')}")
    except Exception as exc:  # missing or unloadable
        print(f"[gpu_check]   {mod:<12} MISSING ({type(exc).__name__}); its parts are skipped or fall back")
EOF
HAVE_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
HAVE_PYTEST=$("$PY" -c "import pytest" 2>/dev/null && echo 1 || echo 0)
if [ "$DRY" = 0 ] && [ "$HAVE_GPU" = 0 ]; then
  say "no CUDA device: run with --dry-run on a CPU"
  exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# ------------------------------------------------------------------ the parts
if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
  if [ "$HAVE_PYTEST" = 1 ] && [ -z "${POA_GPU_CHECK_IN_PYTEST:-}" ]; then
    part "pytest -m gpu (collected; skipped without a GPU)" 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
  else skip "pytest -m gpu" "pytest is not installed, or this dry run runs inside pytest"; fi
  skip "poa bench kernels" "needs a CUDA GPU (Triton's interpreter measures nothing)"
  part "poa bench attention" 120 "$PY" -m poa_hpc bench attention --batch 1 --iters 1 --backends sdpa math --out "$OUT"
  part "poa bench engines (vit_tiny: none, fsdp)" 300 "$PY" -m poa_hpc bench engines --nproc 1 --models vit_tiny \
    --engines none fsdp --batch 2 --steps 1 --warmup 0 --out "$OUT" model.vit.depth=2 model.vit.min_depth=1 \
    data.n_local=1 train.device=cpu
  part "poa bench step (vit_tiny, 2 steps, prediction vs peak)" 300 "$PY" -m poa_hpc bench step --preset vit_tiny \
    --batch 4 --steps 2 --warmup 1 --out "$OUT" model.vit.depth=2 model.vit.min_depth=1 data.n_local=1
else
  if [ "$HAVE_PYTEST" = 1 ]; then
    part "pytest -m gpu" 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
  else skip "pytest -m gpu" "pytest is not installed (carry its wheel in .whl/)"; fi
  part "poa bench kernels" 60 "$PY" -m poa_hpc bench kernels --iters 10 --out "$OUT"
  part "poa bench attention" 45 "$PY" -m poa_hpc bench attention --iters 10 --out "$OUT"
  part "poa bench engines (1 GPU: vit_b, vit_l x none, fsdp)" 150 "$PY" -m poa_hpc bench engines --nproc 1 \
    --models vit_b vit_l --engines none fsdp --batch 32 --steps 5 --warmup 2 --out "$OUT"
  part "poa bench step (ViT-L POA, batch 50, 30 steps)" 150 "$PY" -m poa_hpc bench step --preset vit_l --batch 50 \
    --steps 30 --warmup 5 --out "$OUT"
fi

say "==== summary (JSON in $OUT)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
exit $FAILED
