#!/usr/bin/env bash
# bench/gpu_check.sh WHEEL|none OUTDIR
#
# The one command for a GPU machine that has python + torch but nothing of ours. It installs WHEEL
# (none: use the lowrank already installed), checks that the CUDA library loads, runs the CUDA tests and
# the CUDA fuzz suite, compute-sanitizer memcheck, racecheck and synccheck on bench/sanitizer_smoke.py and
# the CUDA benchmark, then prints a summary LAST. Steps run in that order under one time budget, so on a
# slow machine the last (A/B timing) step is the one cut short. It never compiles anything. Without a GPU it is a dry run: CUDA steps say SKIP and
# the benchmark runs its quick CPU set instead, so the harness itself is exercised.
#
# OUTDIR gets at most 8 files (setup.log pytest.log sanitizer.log bench.log bench_<dev>.json/.md/.png
# summary.txt), so a lent machine that returns 8 files can send all of it back.
# The whole run stays under GPU_CHECK_BUDGET_S seconds (default 570, inside the 10-minute limit of one device call); the last step
# times the environment-selected CUDA paths against each other (bench/ab_paths.py, AB_CONFIGS).
# PYTHON overrides the interpreter (default: ./.venv/bin/python if present, else python3).
set -u
if [ $# -ne 2 ] || [[ $2 == *.whl ]]; then  # a glob that matched two wheels lands here
    echo "usage: bench/gpu_check.sh WHEEL|WHEEL_DIR|none OUTDIR" >&2
    exit 2
fi
WHEEL=$1 OUTDIR=$2
case $WHEEL in none | /*) ;; *) WHEEL=$PWD/$WHEEL ;; esac
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2  # repo root: tests/ and bench/ come from the working tree
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3)}
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-570}
START=$SECONDS
NAMES=() STATUS=() NOTES=()

record() {  # step status note
    NAMES+=("$1") STATUS+=("$2") NOTES+=("$3")
    echo "== $1: $2 $3"
}
limit() {  # seconds for the next step: its own cap, or what is left of the budget
    local left=$((BUDGET - (SECONDS - START)))
    echo $(($1 < left ? $1 : left))
}
run_step() {  # cap log cmd...: runs under timeout; sets RC (124: timed out)
    local t; t=$(limit "$1"); local log=$2; shift 2
    if [ "$t" -le 5 ]; then RC=124; echo "out of time budget" >>"$log"; return; fi
    timeout -k 10 "$t" "$@" >>"$log" 2>&1; RC=$?
}

# 1. install ---------------------------------------------------------------------------------
SETUP=$OUTDIR/setup.log
: >"$SETUP"
if [ "$WHEEL" = none ]; then
    record install SKIP "WHEEL=none: using the installed lowrank"
else
    [ -d "$WHEEL" ] && WHEEL=$(ls "$WHEEL"/lowrank-*.whl 2>/dev/null | head -1)
    # --no-deps/--no-index: torch is already there and the machine may have no network.
    run_step 120 "$SETUP" "$PY" -m pip install --no-deps --no-index --no-compile --force-reinstall "$WHEEL"
    if [ "$RC" -ne 0 ]; then  # e.g. an externally managed system python: install beside it instead
        run_step 120 "$SETUP" "$PY" -m pip install --no-deps --no-index --no-compile --target /tmp/lowrank-site "$WHEEL"
        export PYTHONPATH=/tmp/lowrank-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    [ "$RC" -eq 0 ] && record install PASS "$(basename "$WHEEL")" || record install FAIL "pip failed (setup.log)"
fi

# 2. info --------------------------------------------------------------------------------------
{
    echo "--- python / torch"
    "$PY" -c 'import sys, torch; c = torch.cuda.is_available()
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "| cuda available:", c)
print("gpu", torch.cuda.get_device_name() if c else "none", torch.cuda.get_device_capability() if c else "")'
    echo "--- nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null ||
        echo "nvidia-smi not found or failed"
} 2>&1 | tee -a "$SETUP"
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
record info "$([ "$CUDA" = 1 ] && echo PASS || echo SKIP)" "${GPU:-no GPU visible to torch}"

# 3. load check ----------------------------------------------------------------------------------
LOAD_PY='
import pathlib, sys, torch
try:
    import lowrank
except Exception as e:
    sys.exit(f"import lowrank FAILED: {e!r}")
ok = lowrank.has_cuda_kernels()
print("lowrank", getattr(lowrank, "__version__", "?"), "from", lowrank.__file__, "| has_cuda_kernels:", ok)
if not ok and torch.cuda.is_available():
    print("\n!!!!! lowrank did NOT load its CUDA kernels on a machine with a GPU !!!!!")
    print("Usual causes: the wheel was built without CUDA (no CUDA library below), it was built against")
    print("another torch (undefined symbol), or it needs another CUDA runtime (libcudart.so.N not found).")
    print("torch here:", torch.__version__, "CUDA", torch.version.cuda, "- the loader says, per library:")
    import ctypes
    for so in sorted(pathlib.Path(lowrank.__file__).parent.rglob("*.so*")):
        try:
            ctypes.CDLL(str(so)); print("  loads:", so.name)
        except OSError as e:
            print("  DLOPEN FAILED:", so.name, "->", e)
    sys.exit(1)
sys.exit(0 if ok else 3)  # 3: no GPU here, a dry run
'
echo "--- load check" >>"$SETUP"
run_step 60 "$SETUP" "$PY" -c "$LOAD_PY"
case $RC in
    0) record load PASS "has_cuda_kernels() is True" ;;
    3) record load SKIP "no GPU: lowrank imports, CUDA kernels not expected" ;;
    *) record load FAIL "see setup.log"; sed -n '/^--- load check/,$p' "$SETUP" ;;
esac

# 4. CUDA tests --------------------------------------------------------------------------------
PYTEST_LOG=$OUTDIR/pytest.log
: >"$PYTEST_LOG"
pytest_step() {  # step cap cmd...: one pytest run appended to pytest.log, recorded from its summary line
    local step=$1 cap=$2
    shift 2
    run_step "$cap" "$PYTEST_LOG" "$@"
    LAST=$(grep -E '(passed|failed|error|no tests ran)' "$PYTEST_LOG" | tail -1)
    case $RC in
        0) record "$step" PASS "$LAST" ;;
        5) record "$step" SKIP "no test is marked cuda" ;;
        124) record "$step" FAIL "timed out (pytest.log)" ;;
        *) record "$step" FAIL "$LAST" ;;
    esac
}
if [ "$CUDA" != 1 ]; then
    record pytest-cuda SKIP "no GPU"
elif [ ! -d tests ]; then
    record pytest-cuda SKIP "no tests/ folder in the working tree"
else
    pytest_step pytest-cuda 180 "$PY" -m pytest -m cuda tests -q -rfEs -p no:cacheprovider --ignore=tests/test_fuzz.py
    # The CUDA half of the fuzz suite (hypothesis, every op and module against lowrank.reference, bad inputs),
    # with more examples than CI's default; GPU_FUZZ_EXAMPLES scales it.
    echo "===== fuzz (LOWRANK_FUZZ_EXAMPLES=${GPU_FUZZ_EXAMPLES:-300})" >>"$PYTEST_LOG"
    pytest_step "pytest-cuda fuzz" 90 env LOWRANK_FUZZ_EXAMPLES="${GPU_FUZZ_EXAMPLES:-300}" "$PY" -m pytest -m cuda \
        tests/test_fuzz.py -q -rfEs -p no:cacheprovider
    # The opt-in cuBLAS GEMM path too (LOWRANK_CUBLAS=1), on the families that use the GEMM runner.
    echo "===== LOWRANK_CUBLAS=1" >>"$PYTEST_LOG"
    pytest_step "pytest-cuda cublas" 60 env LOWRANK_CUBLAS=1 "$PY" -m pytest -m cuda tests/test_monarch.py \
        tests/test_sltrain.py -q -rfEs -p no:cacheprovider
    # and the opt-in tensor-core path of fp32 projection (LOWRANK_PROJECTION_FP32_TC=1)
    echo "===== LOWRANK_PROJECTION_FP32_TC=1" >>"$PYTEST_LOG"
    pytest_step "pytest-cuda proj-fp32-tc" 60 env LOWRANK_PROJECTION_FP32_TC=1 "$PY" -m pytest -m cuda \
        tests/test_projection.py tests/test_optim.py -q -rfEs -p no:cacheprovider
fi

# 5. compute-sanitizer memcheck, racecheck, synccheck ------------------------------------------------
SAN_LOG=$OUTDIR/sanitizer.log
: >"$SAN_LOG"
find_sanitizer() {
    command -v compute-sanitizer && return
    ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
        /opt/nvidia/*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1 | grep . && return
    "$PY" -c 'import glob, nvidia  # the pip package nvidia-cuda-sanitizer-api ships it
print(next(iter(sorted(f for p in nvidia.__path__ for f in glob.glob(p + "/*/compute-sanitizer/compute-sanitizer")
                      + glob.glob(p + "/*/bin/compute-sanitizer"))), ""))' 2>/dev/null | grep .
}
SAN=$(find_sanitizer)
if [ "$CUDA" != 1 ]; then
    record sanitizer SKIP "no GPU"
elif [ -z "$SAN" ]; then
    record sanitizer SKIP "compute-sanitizer not found (PATH, /usr/local/cuda*/bin, pip nvidia packages)"
else
    echo "$SAN" >>"$SAN_LOG"
    # memcheck on every smoke case; racecheck (shared-memory hazards) and synccheck (barrier misuse) are
    # slower and run the --quick subset (float32 + bfloat16, fewer shapes: every kernel still launches).
    for TOOL in memcheck racecheck synccheck; do
        CAP=150 ARGS=()
        [ "$TOOL" = memcheck ] || CAP=90 ARGS=(--quick)
        echo "===== $TOOL" >>"$SAN_LOG"
        # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
        run_step $CAP "$SAN_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool $TOOL --error-exitcode 99 \
            --print-limit 20 "$PY" bench/sanitizer_smoke.py ${ARGS[@]+"${ARGS[@]}"}
        if grep -q "Device not supported" "$SAN_LOG"; then record $TOOL SKIP "sanitizer: device not supported here"
        else case $RC in
            0) record $TOOL PASS "smoke: $(grep -o '[0-9]* failure(s)' "$SAN_LOG" | tail -1), no $TOOL errors" ;;
            99) record $TOOL FAIL "$TOOL reported errors (sanitizer.log)" ;;
            124) record $TOOL FAIL "timed out (sanitizer.log)" ;;
            *) record $TOOL FAIL "mismatch or crash, rc $RC (sanitizer.log)" ;;
        esac; fi
    done
fi

# 6. benchmark -----------------------------------------------------------------------------------
BENCH_LOG=$OUTDIR/bench.log
: >"$BENCH_LOG"
BENCH_ARGS=(--device cuda) BENCH=bench-cuda
[ "$CUDA" = 1 ] || BENCH_ARGS=(--device cpu --quick) BENCH="bench-cpu-quick (dry run)"
run_step 300 "$BENCH_LOG" "$PY" -m lowrank.bench "${BENCH_ARGS[@]}" --out "$OUTDIR"
case $RC in
    0) record "$BENCH" PASS "every row matches the float64 reference" ;;
    1) record "$BENCH" FAIL "a correctness check failed (bench.log)" ;;
    124) record "$BENCH" FAIL "timed out (bench.log)" ;;
    *) record "$BENCH" FAIL "could not run or crashed, rc $RC (bench.log)" ;;
esac

# 7. A/B of the paths the environment switches select (bench/ab_paths.py), appended to bench.log --------
AB_LOG=$OUTDIR/bench.log
# One configuration per word; a configuration sets one or more variables, comma-separated.
AB_CONFIGS=${AB_CONFIGS:-"default LOWRANK_CUBLAS=1 LOWRANK_CUBLAS=1,LOWRANK_MONARCH_F1=epilogue LOWRANK_CUBLAS=1,LOWRANK_MONARCH_F1=natural LOWRANK_CUBLAS=1,LOWRANK_MONARCH_FUSED=0 LOWRANK_PROJECTION_FP32_TC=1 LOWRANK_IFAIRY_GEMV_FUSED=0"}
if [ "$CUDA" = 1 ] && [ -f bench/ab_paths.py ]; then
    AB_FAIL=0
    for cfg in $AB_CONFIGS; do
        echo "===== A/B $cfg" >>"$AB_LOG"
        if [ "$cfg" = default ]; then run_step 60 "$AB_LOG" "$PY" bench/ab_paths.py --tag default
        else
            IFS=, read -r -a VARS <<<"$cfg"
            TAG=$(echo "$cfg" | sed 's/LOWRANK_//g; s/MONARCH_//g')
            run_step 60 "$AB_LOG" env "${VARS[@]}" "$PY" bench/ab_paths.py --tag "$TAG"
        fi
        [ "$RC" -eq 0 ] || AB_FAIL=1
    done
    [ "$AB_FAIL" = 0 ] && record ab-paths PASS "$AB_CONFIGS" || record ab-paths FAIL "a configuration failed or timed out (bench.log)"
fi

# summary, printed last --------------------------------------------------------------------------
{
    echo
    echo "================ gpu_check summary ($((SECONDS - START)) s, $(date -u +%FT%TZ)) ================"
    for i in "${!NAMES[@]}"; do printf '%-28s %-5s %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${NOTES[$i]}"; done
    echo
    # the benchmark's own table: from its device header line to the files it wrote
    sed -n '/^\(cuda\|cpu\): /,/^wrote /p' "$BENCH_LOG" | grep -v '^wrote ' || tail -5 "$BENCH_LOG"
    grep -E '^ *[A-Za-z0-9_=.,-]+ (monarch|sltrain|galore|ifairy) ' "$BENCH_LOG" | sed 's/^/A\/B /' || true
    echo "logs and results: $OUTDIR"
} | tee "$OUTDIR/summary.txt"
for s in "${STATUS[@]}"; do [ "$s" = FAIL ] && exit 1; done
exit 0
