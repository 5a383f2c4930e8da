#!/usr/bin/env bash
# The long runs of every experiment, JOBS settings at a time, then gathered per script.
#
# Each setting (one objective, prior, guide, sigma) trains in its own process with a
# wall-clock budget (--max-minutes: it stops at the end of the first epoch after which
# another would overrun the budget), then evaluates log p(x) with K = 5000 (1000 for the
# continuous Gaussian likelihood).  A second pass runs each script once over all its settings
# with --evaluate-only, which trains nothing and writes one results.json and the figures.
# On a GPU every setting runs at once and each gets a share of it; on a CPU run as many at a
# time as there are cores, one thread each.  The results record the epochs each one reached.
#
# Usage: experiments/long_runs.sh DATA_DIR OUT_DIR MINUTES [PYTHON]
#   DATA_DIR  folder with MNIST/raw and binarized_mnist.npz
#   OUT_DIR   one folder per script is made inside it
#   MINUTES   training budget per setting
# Environment: DEVICE (default cuda); JOBS (settings trained at once; default all of them);
# ONLY (the scripts to run, e.g. "compare_guides latent_space"; default all five);
# EXTRA_ARGS (more flags for every run, e.g. a tiny
# "--train-size 200 --test-size 100 --eval-samples 10" to try the script on a CPU);
# EVAL_SECONDS (default 150: time a setting has after its budget to evaluate before it is
# stopped); GATHER_SECONDS (default 300: limit of each gathering run).
set -u
DATA_DIR=$1
OUT_DIR=$2
MINUTES=$3
PYTHON=${4:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR/logs"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
# shellcheck disable=SC2206  # EXTRA_ARGS is split into flags on purpose
COMMON=(--data-dir "$DATA_DIR" --device "${DEVICE:-cuda}" --epochs 3000 --no-progress
        --eval-chunk-size 1000 ${EXTRA_ARGS:-})
# seconds a setting may take in all: training budget, then evaluation and figures
LIMIT=$(python3 -c "print(int($MINUTES * 60 + ${EVAL_SECONDS:-150}))")
MIXTURE_MINUTES=$(python3 -c "print(max(0.5, $MINUTES - 0.5))")  # their evaluation costs more

ONLY=${ONLY:-mnist_vae compare_priors compare_guides gaussian_likelihood latent_space}
JOBS=${JOBS:-1000}

wanted() {  # wanted SCRIPT: is SCRIPT in ONLY
    [[ " $ONLY " == *" $1 "* ]]
}

start() {  # start LOG SCRIPT ARGS...: one setting in the background, once fewer than JOBS run
    local log=$1
    shift
    wanted "${1%.py}" || return 0
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    timeout -s TERM "$LIMIT" "$PYTHON" "experiments/$@" "${COMMON[@]}" \
        >"$OUT_DIR/logs/$log.log" 2>&1 &
}

for objective in trace_elbo iwae5 iwae50; do
    start "mnist_vae_$objective" mnist_vae.py --out-dir "$OUT_DIR/mnist_vae" \
        --objectives "$objective" --max-minutes "$MINUTES"
done
for prior in normal flow; do
    start "compare_priors_$prior" compare_priors.py --out-dir "$OUT_DIR/compare_priors" \
        --priors "$prior" --max-minutes "$MINUTES"
done
for prior in mog vamp; do
    start "compare_priors_$prior" compare_priors.py --out-dir "$OUT_DIR/compare_priors" \
        --priors "$prior" --max-minutes "$MIXTURE_MINUTES"
done
for guide in diagonal fullcov iaf; do
    start "compare_guides_$guide" compare_guides.py --out-dir "$OUT_DIR/compare_guides" \
        --guides "$guide" --max-minutes "$MINUTES"
done
for sigma in 1.0 0.3 0.1 0.03; do
    start "gaussian_likelihood_$sigma" gaussian_likelihood.py \
        --out-dir "$OUT_DIR/gaussian_likelihood" --sigmas "$sigma" --no-learned \
        --max-minutes "$MINUTES"
done
start gaussian_likelihood_learned gaussian_likelihood.py \
    --out-dir "$OUT_DIR/gaussian_likelihood" --sigmas --max-minutes "$MINUTES"
start latent_space latent_space.py --out-dir "$OUT_DIR/latent_space" --max-minutes "$MINUTES"
wait

# one results.json per script, over the settings that left a checkpoint, training nothing more
trained() {  # trained DIR NAMES...: the names that have DIR/NAME/checkpoint.pt
    local dir=$1
    shift
    for name in "$@"; do [ -f "$dir/$name/checkpoint.pt" ] && printf '%s ' "$name"; done
}
LIMIT=${GATHER_SECONDS:-300}
JOBS=1000
O=$OUT_DIR
# shellcheck disable=SC2046  # $(trained ...) gives one word per setting
start gather_mnist_vae mnist_vae.py --out-dir "$O/mnist_vae" --evaluate-only \
    --objectives $(trained "$O/mnist_vae" trace_elbo iwae5 iwae50)
start gather_compare_priors compare_priors.py --out-dir "$O/compare_priors" --evaluate-only \
    --priors $(trained "$O/compare_priors" normal mog vamp flow)
start gather_compare_guides compare_guides.py --out-dir "$O/compare_guides" --evaluate-only \
    --guides $(trained "$O/compare_guides" diagonal fullcov iaf)
learned=$([ -f "$O/gaussian_likelihood/learned/checkpoint.pt" ] || echo --no-learned)
start gather_gaussian_likelihood gaussian_likelihood.py --out-dir "$O/gaussian_likelihood" \
    --evaluate-only $learned --sigmas $(trained "$O/gaussian_likelihood" sigma_1 sigma_0.3 \
    sigma_0.1 sigma_0.03 | sed 's/sigma_//g')
start gather_latent_space latent_space.py --out-dir "$O/latent_space" --evaluate-only
wait
grep -h "log p(x)\|Error\|error" "$OUT_DIR"/logs/*.log | tail -n 40
