#!/usr/bin/env bash
# The GPU check: ONE prepared command for ONE device call, under 8 minutes on an H100/H200 from a
# bare machine (the steps' limits add up to 470 s, at most MAX_TOTAL=480: the dry run checks it).
#
#   here, first (needs PyPI):   bash bench/fetch_wheels.sh       # Liger-Kernel, Cut-Cross-Entropy -> .whl/
#   the device call:            command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 540
#   the plan, on any machine:   bash bench/gpu_check.sh --dry-run   # prints and checks it, runs nothing (CI)
#   some steps only:            bash bench/gpu_check.sh install wheels losses report
#
# Writes under $OUT (what the device call brings back; else bench/results/gpu-check-DATE/) as it
# goes, most important first, so that a timeout still returns what ran:
#   log.txt        the environment, each step's command, output, exit status and seconds
#   logprobs.json  fastppo bench logprobs (N=8192, V=151936 bf16: ours vs TRL/OpenRLHF/verl, torch.compile, Liger)
#   linear.json    fastppo bench linear_logprobs (H=896 and 4096: ours vs the same, Liger, Cut-CE)
#   generate.json  fastppo bench generate (Generator with and without graphs vs HF eager and static+compile)
#   ppo_step.json  fastppo bench ppo_step (the end-to-end trainer step vs TRL's PPOTrainer, tok/s)
#   profile/       fastppo profile: trace.json (Chrome/Perfetto), summary.json, summary.md
#   nccl/          torchrun -m fastppo train, one rank over NCCL on the tests' tiny models (a smoke run)
#   report.md, report.png   python -m fastppo.bench.report over the JSON files
# Each JSON is rewritten after every case. Commit them as bench/results/DEVICE-DATE-STEP.json
# (DEVICE as `fastppo bench` names it: nvidia-h200), then regenerate README's tables from them:
#   python -m fastppo.bench.report --readme README.md bench/results/*.json
# Not in the default plan (a second call, if device time is left; name install and wheels first):
# losses (policy/value loss, KL, GAE, whitening, torch.compile peers included) and tune (the bf16
# tile sweep of the linear kernels).
#
# Everything comes from the image (torch, triton, transformers, pytest) or the carried wheels: no
# registry is reached, and no pytest plugin is assumed (each step is bounded by coreutils' timeout).
set -uo pipefail
set -f  # no pathname expansion of the commands' words (the --impls globs); the steps glob in their own shells
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
out=${OUT:-bench/results/gpu-check-$(date -u +%F)}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}  # the torch.compile peers compile faster

KERNEL_TESTS="tests/test_logprobs.py tests/test_linear_logprobs_triton.py tests/test_policy_loss.py
tests/test_value_loss.py tests/test_kl.py tests/test_gae.py tests/test_generation.py"
GEN_IMPLS="fastppo-graphs,fastppo-eager,hf-*"  # the compiled Generator step is left out: minutes of compilation
BENCH="$PY -m fastppo.bench --device cuda"

# name | limit (s) | command; in the order they run
PLAN=(
  "install|35|$PY -m pip install -q --no-deps --no-build-isolation -e ."
  "wheels|10|install_wheels"
  "env|10|environment"
  "tests|90|env FASTPPO_TEST_CUDA=1 $PY -m pytest -q -x -p no:cacheprovider $(echo $KERNEL_TESTS)"
  "logprobs|75|$BENCH logprobs --output $out/logprobs.json"
  "linear|70|$BENCH linear_logprobs --output $out/linear.json"
  "generate|40|$BENCH generate --impls $GEN_IMPLS --output $out/generate.json"
  "e2e|50|$BENCH ppo_step --output $out/ppo_step.json"
  "profile|40|$PY -m fastppo profile --output-dir $out/profile --max-steps 3"
  "nccl|40|nccl_smoke"
  "report|10|report"
)
EXTRA=(  # not in the default plan: for a second call, when device time is left
  "losses|120|$BENCH losses advantages --output $out/losses.json"
  "tune|540|$PY -m fastppo.bench.tune_linear"
)
DEFAULT_STEPS="install wheels env tests logprobs linear generate e2e profile nccl report"
MAX_TOTAL=480

nccl_smoke() {  # one rank of `torchrun -m fastppo train` on CUDA with NCCL, on the tests' tiny models
    $PY tests/_dist_worker.py models /tmp/nccl-models &&
        $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m fastppo train \
            --model /tmp/nccl-models/policy --reward-model /tmp/nccl-models/rm \
            --prompts /tmp/nccl-models/prompts.txt --max-steps 2 --device cuda --backend nccl \
            --progress-bar false --output-dir "$out/nccl"
}

install_wheels() {  # the baselines' wheels (bench/fetch_wheels.sh), where the call carried .whl/
    if ! compgen -G ".whl/*.whl" >/dev/null; then echo "no .whl/*.whl carried: Liger/CCE rows will be skipped"; return 0; fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}
environment() {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    $PY -m fastppo.cli info
    $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|transformers|liger|cut|flash|pytest) "
}
report() {
    $PY -m fastppo.bench.report "$out"/*.json --full --markdown "$out/report.md" --plot "$out/report.png"
}

extra_names() {
    local entry names=()
    for entry in "${EXTRA[@]}"; do names+=("${entry%%|*}"); done
    echo "${names[*]}"
}
lookup() {  # lookup NAME -> "limit|command"
    local entry
    for entry in "${PLAN[@]}" "${EXTRA[@]}"; do
        if [[ ${entry%%|*} == "$1" ]]; then echo "${entry#*|}"; return 0; fi
    done
    return 1
}

steps=${*:-$DEFAULT_STEPS}
total=0
for step in $steps; do
    spec=$(lookup "$step") || { echo "gpu_check: unknown step '$step'; steps: $DEFAULT_STEPS $(extra_names)" >&2; exit 2; }
    total=$((total + ${spec%%|*}))
done

if ((dry)); then
    echo "gpu_check plan (dry run: nothing is run), output to \$OUT or $out:"
    for step in $steps; do
        spec=$(lookup "$step")
        printf '  %-9s %4ss  %s\n' "$step" "${spec%%|*}" "${spec#*|}"
    done
    echo "  total     ${total}s (limit ${MAX_TOTAL}s for the default plan)"
    status=0
    if [[ "$steps" == "$DEFAULT_STEPS" ]] && ((total > MAX_TOTAL)); then
        echo "FAIL: the steps' limits add up to ${total}s, over ${MAX_TOTAL}s"; status=1
    fi
    for f in $KERNEL_TESTS; do
        [[ -f $f ]] || { echo "FAIL: test file $f does not exist"; status=1; }
    done
    # The bench steps must name real ops and implementations: list each plan for CUDA (builds no input).
    for args in "logprobs linear_logprobs losses advantages" "generate --impls $GEN_IMPLS"; do
        n=$($PY -m fastppo.bench --device cuda --list $args 2>&1 | grep -c -v skipped) \
            || { echo "FAIL: fastppo bench --list $args"; status=1; continue; }
        echo "  bench $args: $n benchmarks listed for CUDA"
        ((n > 0)) || { echo "FAIL: fastppo bench $args would time nothing"; status=1; }
    done
    # e2e and profile name commands that are being built: checked once they exist, noted until then.
    # (ppo_step times its implementations itself, interleaved: --list names none of them.)
    if e2e=$($PY -m fastppo.bench --device cuda --list ppo_step 2>&1); then
        echo "  bench ppo_step: a known op"
    elif grep -q "unknown benchmark 'ppo_step'" <<<"$e2e"; then
        echo "  note: fastppo bench has no op ppo_step yet: the e2e step would fail"
    else
        echo "FAIL: fastppo bench --list ppo_step: $(tail -n 1 <<<"$e2e")"; status=1
    fi
    if help=$($PY -m fastppo profile --help 2>&1); then
        for flag in --output-dir --max-steps; do
            grep -q -e "$flag" <<<"$help" || { echo "FAIL: fastppo profile has no $flag"; status=1; }
        done
        echo "  profile: fastppo profile takes --output-dir and --max-steps"
    else
        echo "  note: there is no fastppo profile yet: the profile step would fail"
    fi
    exit $status
fi

mkdir -p "$out"
log="$out/log.txt"
echo "gpu_check: steps $steps (limits ${total}s), output $out" | tee -a "$log"
for step in $steps; do
    spec=$(lookup "$step")
    limit=${spec%%|*} cmd=${spec#*|}
    echo "== $step (limit ${limit}s): $cmd" | tee -a "$log"
    t0=$SECONDS
    if declare -F "$cmd" >/dev/null; then  # a function of this script: runs in this shell
        export -f install_wheels environment report nccl_smoke
        export PY out
        timeout -k 5 "$limit" bash -c "$cmd" 2>&1 | tee -a "$log"
    else
        timeout -k 5 "$limit" $cmd 2>&1 | tee -a "$log"
    fi
    rc=${PIPESTATUS[0]}
    echo "== $step: exit $rc$( ((rc == 124)) && echo ' (timed out)'), $((SECONDS - t0))s" | tee -a "$log"
    if [[ $step == wheels && $rc == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [[ $step == install && $rc != 0 ]]; then
        echo "gpu_check: the install failed; nothing else can run" | tee -a "$log"; exit 1
    fi
done
echo "gpu_check: done in ${SECONDS}s" | tee -a "$log"
