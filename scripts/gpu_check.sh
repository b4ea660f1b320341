#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run for a lent GPU machine (never part of `make test`).
#
#   bash scripts/gpu_check.sh wheels   # here, with network: the cp312 wheels the GPU machine lacks, into .whl/
#   bash scripts/gpu_check.sh          # there: install them (--no-deps), then run every check below
#
# The GPU machine has Python 3.12, torch (CUDA), transformers, safetensors and aiohttp, and no network; what
# else sllmd imports travels as wheels (.whl/, ignored by git: name it in the device tool's `carry`).
# Checks, each writing its output under $OUT (or ./gpu-check-out) and going on when one fails:
#   1. tests that take the CUDA path when a GPU is visible: the architecture matrix served from CUDA devices and
#      compared with transformers' generate(), the loader's pinned pool and device copies, migration between
#      engines, the transformers engine, two instances sharing one GPU within their memory budgets;
#   2. scripts/bench_loader.py --device cuda: SSD -> pinned pool -> GPU, and a DRAM-cache hit, against the disk
#      and the host-to-device copy limits;
#   3. scripts/bench_coldstart.py: a daemon's cold start on a CUDA device (SSD tier, then DRAM tier after
#      scale-to-zero) and the warm TTFT;
#   4. the vLLM backend's GPU start path and sleep/wake (scripts/bench_vllm_start.py): only where vLLM imports;
#      otherwise the summary says it was not verified.
# At most ~8 minutes (each check has its own limit). The last line printed is one JSON object: which checks
# ran, passed, failed or were skipped, with the JSON results of the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(lmdb==1.7.5 pyzmq==27.1.0 msgpack==1.1.2 uvloop==0.22.1 aiofiles==25.1.0 xxhash==3.6.0
        prometheus-client==0.23.1 pytest==8.4.2 pytest-asyncio==1.2.0 pytest-timeout==2.4.0 iniconfig==2.3.0
        pluggy==1.6.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.11.0 sniffio==1.3.1)

if [[ "${1:-}" == "wheels" ]]; then
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
PY=python3

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

declare -A RESULT
run_check() {  # name, timeout seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then RESULT[$name]=passed; else RESULT[$name]="failed($?)"; fi
    tail -n 3 "$OUT/$name.log"
}

run_check tests 180 $PY -m pytest -q -x -p no:cacheprovider -m "not vllm" \
    tests/test_architectures.py tests/test_loader.py tests/test_migration_engine.py tests/test_engine_transformers.py \
    tests/test_capacity.py
run_check loader 100 $PY scripts/bench_loader.py --device cuda --size-gb 2 --runs 3 --json
run_check coldstart 100 $PY scripts/bench_coldstart.py --json --runs 2
if $PY -c 'import vllm' 2> /dev/null; then
    run_check vllm_start 90 $PY scripts/bench_vllm_start.py --layers 8
else
    RESULT[vllm_start]="skipped(vllm not installed: GPU start path and sleep/wake unverified)"
fi

{
    printf '{"gpu": "%s"' "$(head -n 1 "$OUT/gpu.txt" | tr -d '"')"
    for name in tests loader coldstart vllm_start; do
        printf ', "%s": "%s"' "$name" "${RESULT[$name]}"
        last=$(tail -n 1 "$OUT/$name.log" 2> /dev/null)
        [[ "$last" == "{"* ]] && printf ', "%s_json": %s' "$name" "$last"
    done
    printf '}\n'
} | tee "$OUT/summary.json"
