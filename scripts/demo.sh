#!/usr/bin/env bash
# The demo: run a sample job (a multi-threaded heat solver) as a ckpt job
# (its own cgroup and PID, IPC, UTS and mount namespaces), checkpoint it
# mid-run, kill it, restore it from its images into new namespaces, and
# check that its final result equals an uninterrupted run's. Leaves
# nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
AGENT=$BIN/ckpt-agent
JOB=$BIN/stencil
# Not under /tmp: a job gets a private /tmp of its own.
WORK=$(mktemp -d /var/tmp/ckpt-demo.XXXXXX)
JOBID=demo-$$
JOBPID=
cleanup() {
    [ -n "$JOBPID" ] && kill -9 "$JOBPID" 2>/dev/null || true
    for cg in /sys/fs/cgroup/unified/ckpt /sys/fs/cgroup/ckpt /sys/fs/cgroup/freezer/ckpt; do
        for _ in 1 2 3 4 5; do
            [ -d "$cg/$JOBID" ] || break
            rmdir "$cg/$JOBID" 2>/dev/null || sleep 0.2
        done
    done
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

inner() { awk '/^NSpid:/ {print $NF}' "/proc/$1/status"; }
step "starting the job as ckpt job $JOBID (ckpt-agent run: own cgroup and namespaces)"
# The program runs from the work dir: the job cannot see the node's /tmp,
# where a checkout may live. Its descriptors are 0-2 only (run closes the
# rest).
cp "$JOB" "$WORK/stencil"
(cd "$WORK" && exec "$OLDPWD/$AGENT" run --job "$JOBID" --hostname demo-job --detach \
    --pidfile "$WORK/job.pid" -- "$WORK/stencil" >"$WORK/job.out" 2>&1 </dev/null)
JOBPID=$(cat "$WORK/job.pid")
sleep 1.5
step "job root: pid $JOBPID on the node, pid $(inner "$JOBPID") inside its namespace; at: $(tail -n1 "$WORK/job.out")"

step "checkpointing job $JOBID (ckpt-agent dump: freeze its cgroup, dump, kill)"
$AGENT dump --tree "$JOBPID" --images "$WORK/images"
JOBPID=
step "images: $(du -sh "$WORK/images" | cut -f1) in $(ls "$WORK/images" | wc -l) files"

step "restoring from the images into new namespaces (ckpt-agent restore --detach)"
JOBPID=$($AGENT restore --images "$WORK/images" --detach)
step "restored: pid $JOBPID on the node, pid $(inner "$JOBPID") inside, threads: $(ls /proc/$JOBPID/task | wc -l)"

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
