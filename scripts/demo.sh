#!/usr/bin/env bash
# The demo: run a sample job (a multi-threaded heat solver), checkpoint it
# mid-run, kill it, restore it from its images, and check that its final
# result equals an uninterrupted run's. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
AGENT=$BIN/ckpt-agent
JOB=$BIN/stencil
WORK=$(mktemp -d /tmp/ckpt-demo.XXXXXX)
JOBPID=
cleanup() {
    [ -n "$JOBPID" ] && kill -9 "$JOBPID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

t0=$(date +%s.%N)
step() { printf '[%6.2fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"; }
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }

step "probing this node's kernel (ckpt-agent check)"
$AGENT check >"$WORK/check.txt" || { cat "$WORK/check.txt"; exit 1; }
grep -E '^(ptrace_seize|clone3_set_tid|pagemap_scan|vdso_layout) ' "$WORK/check.txt" | sed 's/^/          /'

step "reference: running the job uninterrupted"
$JOB >"$WORK/reference.out" </dev/null
want=$(grep '^checksum' "$WORK/reference.out")
step "reference result: $want"

step "starting the job again"
# Only regular files and /dev/null as its descriptors (a pipe inherited
# from whoever runs the demo would be refused: pipes come with trees).
(
    for fd in $(ls /proc/$BASHPID/fd); do
        [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    exec $JOB >"$WORK/job.out" 2>&1 </dev/null
) &
JOBPID=$!
sleep 1.5
step "job pid $JOBPID is at: $(tail -n1 "$WORK/job.out")"

step "checkpointing pid $JOBPID (ckpt-agent dump; the job is killed after the dump)"
$AGENT dump --tree "$JOBPID" --images "$WORK/images"
{ wait "$JOBPID"; } 2>/dev/null || true
JOBPID=
step "images: $(du -sh "$WORK/images" | cut -f1) in $(ls "$WORK/images" | wc -l) files"

step "restoring from the images (ckpt-agent restore --detach)"
JOBPID=$($AGENT restore --images "$WORK/images" --detach)
step "restored as pid $JOBPID, threads: $(ls /proc/$JOBPID/task | wc -l)"

for _ in $(seq 600); do
    grep -q '^checksum' "$WORK/job.out" && break
    sleep 0.1
done
JOBPID=
got=$(grep '^checksum' "$WORK/job.out" || echo "no result")
step "restored job finished: $got"
if [ "$got" = "$want" ]; then
    step "PASS: the checkpointed and restored run computed the same result as the uninterrupted one"
else
    step "FAIL: expected '$want', got '$got'"
    cat "$WORK/job.out"
    exit 1
fi
