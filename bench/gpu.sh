#!/usr/bin/env bash
# The device checks, as one script sized to a short lease on one GPU: the versions, the
# fast test subset on the GPU, then the update-step, monitor and writer benchmarks on the
# trees that fit the time, the example's transformer train step, and the stability
# benchmark's step costs (every defense as its code does it) on its tree and a larger one. Each part has its own
# time limit and a failure of one does not stop the others; everything lands in RESULTS
# (default $OUT, else bench/results/gpu), packed into one archive after every part so that
# a cut-off run still returns what it finished.
#
#     bash bench/gpu.sh            # on the GPU machine, from the repository root
#     QUICK=1 bash bench/gpu.sh    # tiny trees, to check the script itself on any machine
#     ONLY=writer,packed bash bench/gpu.sh   # only the parts named
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU inside one process: neither may take it all up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
dest=${RESULTS:-${OUT:-bench/results/gpu}}
work=$(mktemp -d)
mkdir -p "$dest"
q=${QUICK:+--quick}

part() {  # part NAME SECONDS COMMAND...: run one part, log it, pack what exists so far
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && ",$ONLY," != *",$name,"* ]]; then return; fi
    echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ)" | tee -a "$work/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$work/log.txt"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$work/log.txt"
    tar -czf "$dest/gpu_results.tar.gz" -C "$work" .
}

part versions 30 bash -c "nvidia-smi -L; $py -c 'import jax, jaxlib, optax, flax, numpy, sys
print(sys.version); print(jax.devices())
for m in (jax, jaxlib, optax, flax, numpy): print(m.__name__, m.__version__)
import torch; print(\"torch\", torch.__version__, torch.cuda.is_available())'; git log -1 --format=%H 2>/dev/null || true"
part tests 100 "$py" -m pytest -q -x -n 8 -p no:cacheprovider -p no:benchmark tests/test_battery.py tests/test_matches_optax.py tests/test_optax_compat.py
part update_step 180 "$py" bench/update_step.py $q --trees single16,single64,transformer \
    --pipelines clip+adamw,robust_adamw --impls optax,adaptx,jax,torch --no-c --reps 30 \
    --out "$work/update_step"
part packed 120 "$py" bench/update_step.py $q --trees transformer --pipelines clip+adamw \
    --impls optax,adaptx,adaptx-packed,torch --no-c --reps 30 --out "$work/update_packed"
part monitor 80 "$py" -m bench.paired monitor $q --trees single16,single64,transformer \
    --recipes adamw,robust_adamw --out "$work/monitor_paired"
part writer 60 "$py" -m bench.writer_cost $q --trees single16,single64,transformer --out "$work/writer"
part train 150 "$py" bench/train_step.py $q --encoder transformer --recipes grad-only,adamw,robust_adamw \
    --batch-size 128 --max-len 128 --embed-dim 256 --hidden-dim 256 --layers 4 --reps 20 \
    --out "$work/train_step_transformer"
# A GPU step takes about a millisecond: longer rounds than on the CPU, for a tighter spread.
timing="--rounds 25 --reps 40"
[[ -n ${QUICK:-} ]] && timing="--rounds 3 --reps 2"
part stability_cost 150 "$py" -m bench.stability --cost-only $q $timing \
    --out "$work/stability_cost"
large=${QUICK:+64,2,512}
part stability_cost_large 200 "$py" -m bench.stability --cost-only $q $timing \
    --tree "${large:-1024,8,32768}" \
    --out "$work/stability_cost_large"
rm -rf "$work"
