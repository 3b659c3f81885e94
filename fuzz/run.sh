#!/usr/bin/env bash
# Runs every fuzz target for ${FUZZ_SECONDS:-60} seconds, starting from the committed seeds.
# Exits non-zero if any target finds a crash (the input is left in fuzz/artifacts/<target>/).
#
#   bash fuzz/run.sh                      # from the repository root (or anywhere)
#   FUZZ_SECONDS=600 bash fuzz/run.sh     # longer
#   bash fuzz/run.sh channel_recv         # some targets only
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain (FUZZ_TOOLCHAIN,
# default "nightly"): libFuzzer needs -Zsanitizer and -Cpasses that stable rustc refuses.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
secs=${FUZZ_SECONDS:-60}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=(frame_decode frame_roundtrip channel_recv primary_protocol)
fi

if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: needs cargo-fuzz and the $toolchain toolchain (cargo install cargo-fuzz)" >&2
    exit 2
fi

# Past MAX_FRAME (4096), so the length and truncation checks are reached too.
max_len() {
    case "$1" in
        channel_recv) echo 8192 ;;
        primary_protocol) echo 16384 ;;
        *) echo 4200 ;;
    esac
}

# Extra libFuzzer flags. primary_protocol forks a real cluster per run, and forkcluster refuses
# to fork in a process with threads: libFuzzer's RSS watchdog is a thread (-rss_limit_mb=0
# turns it off; -jobs/-workers must not be used). A run takes tens of milliseconds; -timeout
# catches a hang that the target's own 5 s deadlines would not.
extra_flags() {
    case "$1" in
        primary_protocol) echo "-rss_limit_mb=0 -timeout=60" ;;
        *) echo "" ;;
    esac
}

cargo "+$toolchain" fuzz build || exit 2
failed=()
for t in "${targets[@]}"; do
    echo "=== fuzz $t for ${secs}s"
    mkdir -p "fuzz/corpus/$t"
    # The first corpus directory is the one libFuzzer writes new inputs to; the seeds (and
    # the inputs that found bugs, fuzz/regressions/<target>/) are only read; libFuzzer runs
    # every input of every directory once before it starts mutating.
    dirs=("fuzz/corpus/$t" "fuzz/seeds/$t")
    if [ -d "fuzz/regressions/$t" ]; then
        dirs+=("fuzz/regressions/$t")
    fi
    # shellcheck disable=SC2046 # the extra flags are words
    if ! cargo "+$toolchain" fuzz run "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -print_final_stats=1 \
        $(extra_flags "$t"); then
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/run.sh: crash or error in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/run.sh: ${#targets[@]} targets ran ${secs}s each, no crash"
