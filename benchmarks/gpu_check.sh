#!/usr/bin/env bash
# The GPU check: everything this project can only measure on a CUDA GPU, in one run of under 8 minutes.
#
#   1. the gpu-marked tests                                  -> benchmarks/results/gpu_tests.json
#   2. the Trainer benchmark, every speed-up vs none         -> benchmarks/results/gpu_trainer.json
#   3. evaluate_model generation throughput, speed-ups vs none (float32, default attention) and with the
#      compiled decode step                                  -> benchmarks/results/gpu_eval_throughput.json
#   plus the GPU, driver and versions                        -> benchmarks/results/gpu_machine.json
#
# Run from the repository root with the project's environment active (HF_HUB_OFFLINE is set here):
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same steps, quick sizes, to check the plumbing
#
# Each step has its own time limit (so the whole check stays under 8 minutes even if one hangs), and a step
# that fails is recorded in its JSON and does not stop the others; the exit status is that of the worst step.
# The Trainer benchmark writes its own results file; on the GPU it is moved to gpu_trainer.json, and the
# committed CPU figures are left as they are.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
RESULTS=benchmarks/results
[[ $DRY == 1 ]] && RESULTS=${DRY_RUN_RESULTS:-/tmp/gpu_check_dry_run}  # a dry run never poses as GPU figures
mkdir -p "$RESULTS"
status=0
started=$(date +%s)

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it under a time limit, log, keep the worst status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tail -n 40
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
    (( rc > status )) && status=$rc
    return "$rc"
}

# 0. the machine
"$PYTHON" - > "$RESULTS/gpu_machine.json" <<'EOF'
import json, platform, subprocess, importlib.metadata as md
import torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if torch.cuda.is_available() else None
print(json.dumps({
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "capability": torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None,
    "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "nvidia_smi": smi,
    "versions": {n: v(n) for n in ("torch", "transformers", "flash-attn", "triton", "accelerate")},
    "python": platform.python_version()}, indent=2))
EOF
cat "$RESULTS/gpu_machine.json"
if [[ $DRY == 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "No CUDA GPU here: run with --dry-run to check the plumbing only." >&2
    exit 2
fi

# 1. the gpu-marked tests (skipped, not failed, without a GPU)
step "gpu tests" 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs --junitxml="$RESULTS/gpu_tests.xml" tests
"$PYTHON" - "$RESULTS/gpu_tests.xml" > "$RESULTS/gpu_tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
cases = [{"test": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time", 0)),
          "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")}
         for c in suite.iter("testcase")]
print(json.dumps({"tests": len(cases), "by_outcome": {o: sum(c["outcome"] == o for c in cases)
                  for o in ("passed", "failure", "error", "skipped")}, "cases": cases}, indent=2))
EOF
rm -f "$RESULTS/gpu_tests.xml"

# 2. the Trainer benchmark (plain vs SpeedupCallback() alone vs planned, compile included): on the GPU its
#    script writes benchmarks/results/bench_trainer_cuda.json, moved to gpu_trainer.json; the dry run on CPU
#    writes bench_trainer_quick.json, whose committed copy is put back afterwards
if [[ $DRY == 1 ]]; then trainer_args=(--quick --runs 1 --device cpu); own=benchmarks/results/bench_trainer_quick.json
else trainer_args=(--runs 2 --device cuda --compile); own=benchmarks/results/bench_trainer_cuda.json; fi
cpu_copy=$(mktemp)
[[ -f $own ]] && cp "$own" "$cpu_copy"
step "trainer benchmark" 190 "$PYTHON" benchmarks/bench_trainer.py "${trainer_args[@]}" \
    && mv "$own" "$RESULTS/gpu_trainer.json"
if [[ -s $cpu_copy ]]; then cp "$cpu_copy" "$own"; else git checkout -q -- "$own" 2>/dev/null || rm -f "$own"; fi
rm -f "$cpu_copy"

# 3. evaluate_model generation throughput, speed-ups vs none
if [[ $DRY == 1 ]]; then eval_args=(--examples 8 --runs 2 --new-tokens 4 --random-model); else eval_args=(--runs 3); fi
step "evaluate_model throughput" 160 "$PYTHON" benchmarks/bench_eval_scale.py --gpu "${eval_args[@]}" \
    --output "$RESULTS/gpu_eval_throughput.json"

echo "GPU check finished in $(( $(date +%s) - started ))s with status $status; figures in $RESULTS/gpu_*.json"
exit "$status"
