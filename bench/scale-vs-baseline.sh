#!/usr/bin/env bash
# The scale section of the benchmark, run side by side for an older commit and the working
# tree: each side's own harness drives its own driver (an older harness may not pass the
# flags a newer driver wants, and the reverse), runs alternate old, new, old, new in one
# window, and the ratios are of runs made minutes apart. On a shared machine the same run
# repeated moves by up to 1.7x, so a figure compared against one recorded days earlier says
# more about the machine than about the code.
#
#   bench/scale-vs-baseline.sh [BASE_COMMIT] [ROUNDS]     (as root; default 540ee78, 3 rounds)
#
# 540ee78 is the commit whose 12.3 s for 1000 stage+publish issue 16 set out to beat 3x.
# It prints one line per run and the ratios; each run's report and driver log (whose `ms=`
# fields give each node call's steps) stay in the directory it prints last.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-540ee78}
rounds=${2:-3}
root=$(pwd)
base_target=${BASE_TARGET_DIR:-$root/target/baseline-$base}
out=$(mktemp -d /tmp/loopvol-scale-vs-baseline.XXXXXX)
tree="$out/tree"

git worktree add --detach -f "$tree" "$base" >/dev/null
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || true' EXIT
(cd "$tree" && CARGO_TARGET_DIR="$base_target" cargo build --release -q -p loopvol-driver -p bench)
cargo build --release -q -p loopvol-driver -p bench

# The old harness knows no --scale-* flags; its scale section is 1000 volumes, 32 workers.
run() { # side round
    local dir="$out/$1-$2"
    mkdir -p "$dir"
    if [ "$1" = base ]; then
        "$base_target/release/bench" --no-build --loopvol "$base_target/release/loopvol" \
            --only scale --out-dir "$dir" --driver-log "$dir/driver.log" >"$dir/out.txt" 2>&1
    else
        target/release/bench --no-build --loopvol target/release/loopvol --only scale \
            --scale-volumes 1000 --scale-concurrency 32 --out-dir "$dir" \
            --driver-log "$dir/driver.log" >"$dir/out.txt" 2>&1
    fi
    # "| phase | succeeded | failures | wall time | ..." rows of the scale table.
    local up down
    up=$(awk -F'|' '$2 ~ /^ NodeStage\+NodePublish $/ {gsub(/ s| /, "", $5); print $5}' "$dir/benchmarks.md")
    down=$(awk -F'|' '$2 ~ /^ NodeUnpublish\+NodeUnstage $/ {gsub(/ s| /, "", $5); print $5}' "$dir/benchmarks.md")
    echo "$1 $2 $up $down $(cut -d' ' -f1 /proc/loadavg)" >>"$out/runs"
    printf '%-5s round %s: stage+publish %6s s, unpublish+unstage %6s s\n' "$1" "$2" "$up" "$down"
}

for r in $(seq 1 "$rounds"); do
    run base "$r"
    run new "$r"
done

awk '
    { wall[$1, $2] = $3; down[$1, $2] = $4; n = ($2 > n ? $2 : n) }
    END {
        for (r = 1; r <= n; r++)
            printf "round %d: stage+publish %.2fx less wall time, teardown %.2fx\n",
                r, wall["base", r] / wall["new", r], down["base", r] / down["new", r]
    }' "$out/runs"
echo "reports: $out"
