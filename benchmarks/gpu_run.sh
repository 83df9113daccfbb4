#!/usr/bin/env bash
# The GPU session's one prepared script (run on the lent device machine from the repository root):
# lays the package out without pip (the machine's own torch/triton are used), then runs the kernel and
# forward checks + benchmarks and the CLI's generate on CUDA. Logs go to $OUT (or ./gpu-out).
set -o pipefail
export PYTHONUNBUFFERED=1
R=$PWD; O=${OUT:-$R/gpu-out}; mkdir -p "$O"
S=/tmp/dsv3site; rm -rf $S; mkdir -p $S
cp -r dsv3tools $S/ && cp -r converters $S/dsv3tools/converters && cp -r kernels $S/dsv3tools/kernels \
  && cp -r evals $S/dsv3tools/evals || exit 3
export PYTHONPATH=$S
cd /tmp
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv 2>&1 | tee "$O/env.txt"
python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$O/env.txt"
echo "== gpu_kernels"; timeout ${KT:-300} python3 "$R/benchmarks/gpu_kernels.py" 2>&1 | tee "$O/kernels.txt"; echo "rc=$?"
echo "== gpu_forward"; T=""; [ -d "$R/.devcarry/trained" ] && T="--trained $R/.devcarry/trained"
timeout ${FT:-200} python3 "$R/benchmarks/gpu_forward.py" --workdir /tmp/gw $T 2>&1 | tee "$O/forward.txt"; echo "rc=$?"
echo "== generate --device cuda"
for extra in "" "--mtp --k 2"; do
  timeout 60 python3 -m dsv3tools generate --model /tmp/gw/tiny-fp8 --prompt "The quick brown" --max-new-tokens 12 --device ${GDEV:-cuda} $extra --json 2>&1 | tail -3 | tee -a "$O/generate.txt"
done
