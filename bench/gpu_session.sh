#!/usr/bin/env bash
# What a session with a lent GPU runs, one stage per device call (each call is limited to 10 minutes):
#
#   bash bench/fetch_wheels.sh           # HERE first (needs PyPI): Liger-Kernel, Cut-Cross-Entropy -> .whl/
#   bash bench/gpu_session.sh tests      # install, environment, CUDA test suite (kernels compiled, not interpreted)
#   bash bench/gpu_session.sh kernels    # logits / linear log-prob, loss and GAE benchmarks
#   bash bench/gpu_session.sh generate   # rollout generation benchmark
#   bash bench/gpu_session.sh tune       # time alternative bf16 tiles of the linear kernels (then edit GPU_CONFIGS)
#
# Each device call carries ".whl" so that the baselines are importable there.
# Output files go to $OUT (the device tool brings them back) or bench/results/gpu-DATE/; commit them
# under bench/results/ with the device name and versions that env.txt records.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bench/gpu_session.sh tests|kernels|generate|tune}
out=${OUT:-bench/results/gpu-$(date -u +%F)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# The GPU image has torch/triton/transformers but no registry: install only our package, and the
# baseline wheels bench/fetch_wheels.sh saved in .whl/ when the call carried it.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps --no-build-isolation -e .
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

run() {  # run NAME TIMEOUT CMD...: output to $out/NAME.txt and to the console
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee "$out/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

case $stage in
tests)
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m fastppo.cli info;
      python3 -c "import liger_kernel, cut_cross_entropy" 2>&1 | tail -1;
      PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|transformers|liger|cut)"; } > "$out/env.txt" 2>&1
    cat "$out/env.txt"
    run cuda_tests 540 env FASTPPO_TEST_CUDA=1 python3 -m pytest -q -p no:cacheprovider -x --timeout 120
    ;;
kernels)
    run bench_logprobs 200 python3 bench/bench_logprobs.py
    run bench_linear_logprobs 200 python3 bench/bench_linear_logprobs.py
    run bench_losses 90 python3 bench/bench_losses.py
    run bench_gae 60 python3 bench/bench_gae.py
    ;;
generate)
    run bench_generate 560 python3 bench/bench_generate.py
    ;;
tune)
    run tune_linear 560 python3 bench/bench_linear_logprobs.py --sweep --reps 5
    ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
