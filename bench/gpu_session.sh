#!/usr/bin/env bash
# Former stage names, kept as thin aliases of bench/gpu_check.sh (the one prepared command that
# fits one device call: read its header). Each stage installs first, as the old one did.
#
#   bash bench/gpu_session.sh tests      # = gpu_check.sh install wheels env tests
#   bash bench/gpu_session.sh kernels    # = ... logprobs linear losses report
#   bash bench/gpu_session.sh generate   # = ... generate report
#   bash bench/gpu_session.sh tune       # = ... tune (the bf16 tile sweep of the linear kernels)
set -euo pipefail
here="$(dirname "$0")"
case ${1:?usage: bench/gpu_session.sh tests|kernels|generate|tune (prefer bench/gpu_check.sh)} in
tests) exec bash "$here/gpu_check.sh" install wheels env tests ;;
kernels) exec bash "$here/gpu_check.sh" install wheels env logprobs linear losses report ;;
generate) exec bash "$here/gpu_check.sh" install wheels env generate report ;;
tune) exec bash "$here/gpu_check.sh" install wheels tune ;;
*) echo "unknown stage $1; the GPU check is bench/gpu_check.sh" >&2; exit 2 ;;
esac
