#!/usr/bin/env bash
# The prepared device run of issue 12: CUDA tests, then the GPU benchmark, one command, < 8 min on
# one H100/H200. Results go to $OUT (the device tool's folder) or runs/gpu.
#
#   bash benchmarks/gpu_check.sh              # tests + `benchmarks/gpu.py --shape 1b`
#   QUICK=1 bash benchmarks/gpu_check.sh      # smoke sizes (also runs on a CPU-only machine)
#
# The device machine has torch, transformers, peft and triton but not this package: a shim on
# PYTHONPATH maps the repository's folders to `peftserve.*`, as the installed package does.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
shim=$(mktemp -d)
mkdir -p "$shim/peftserve"
for pkg in server adapters clients; do ln -s "$PWD/$pkg" "$shim/peftserve/$pkg"; done
export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

echo "== versions"
$py -c "import torch, transformers, peft; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no gpu',
      '| transformers', transformers.__version__, '| peft', peft.__version__)" | tee "$out/versions.txt"

echo "== tests: paged attention, fixed-shape decode + CUDA graphs vs eager (CPU and CUDA), every kind vs its oracle"
$py -m pytest -q -p no:cacheprovider tests/test_paged_attention.py tests/test_static_decode.py \
    tests/test_gathered_ops.py tests/test_triton_attention.py tests/test_triton_lora.py tests/test_kinds_parity.py 2>&1 \
    | tee "$out/tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark: CUDA parity of every kind mixed (fp32) + throughput (bf16)"
if [ -n "${QUICK:-}" ]; then
    $py benchmarks/gpu.py --shape smollm --quick --out "$out/gpu_quick.json" 2>&1 | tail -40 || status=1
else
    timeout 420 $py benchmarks/gpu.py --shape 1b --out "$out/gpu_1b.json" 2>&1 | tail -60 || status=1
fi
rm -rf "$shim"
exit $status
