#!/usr/bin/env bash
# The demo: on a simulated cluster of two nodes (ckpt-lab: network and UTS
# namespaces on a fabric bridge, a shared directory), run a sample job (a
# multi-threaded heat solver) as a ckpt job on node 1 with its own address,
# checkpoint it mid-run with node 1's agent, destroy node 1, restore the job
# with node 2's agent from the shared directory (same PIDs inside, same
# address and MAC, now on node 2), and check that its final result equals
# an uninterrupted run's. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$PWD/target/release
AGENT=$BIN/ckpt-agent
LABCTL=$BIN/ckpt-lab
JOB=$BIN/stencil
# Not under /tmp: a job gets a private /tmp of its own.
WORK=$(mktemp -d /var/tmp/ckpt-demo.XXXXXX)
JOBID=demo-$$
JOBPID=
LAB=
cleanup() {
    [ -n "$JOBPID" ] && kill -9 "$JOBPID" 2>/dev/null || true
    [ -n "$LAB" ] && "$LABCTL" down "$LAB" >/dev/null 2>&1 || true
    for cg in /sys/fs/cgroup/unified/ckpt /sys/fs/cgroup/ckpt /sys/fs/cgroup/freezer/ckpt; do
        for _ in 1 2 3 4 5; do
            [ -d "$cg/$JOBID" ] || break
            rmdir "$cg/$JOBID" 2>/dev/null || sleep 0.2
        done
        # The node's last job takes the agent's parent cgroup with it.
        rmdir "$cg" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

t0=$(date +%s.%N)
step() { printf '[%6.2fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"; }
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }

step "probing this machine's kernel (ckpt-agent check)"
$AGENT check >"$WORK/check.txt" || { cat "$WORK/check.txt"; exit 1; }
grep -E '^(ptrace_seize|clone3_set_tid|pagemap_scan|tcp_repair|veth) ' "$WORK/check.txt" | sed 's/^/          /'

step "reference: running the job uninterrupted"
$JOB >"$WORK/reference.out" </dev/null
want=$(grep '^checksum' "$WORK/reference.out")
step "reference result: $want"

step "bringing up a simulated cluster of 2 nodes (ckpt-lab up)"
eval "$("$LABCTL" up --nodes 2 2>/dev/null)"
read -r NODE1 NODE2 <<<"$NODES"
ADDR=198.18.$LAB.100
step "lab $LAB: nodes $NODE1 and $NODE2 on $SUBNET, shared directory $SHARED"
on() { local n=$1; shift; "$LABCTL" exec "$LAB" "$n" -- "$@"; }
inner() { awk '/^NSpid:/ {print $NF}' "/proc/$1/status"; }
jobaddr() { nsenter --net="/proc/$1/ns/net" ip -o -4 addr show dev eth0 | awk '{print $4}'; }
where() { # which lab node's bridge holds the job's veth
    for n in $NODES; do
        if nsenter --net="/run/netns/$n" ip -o link show master br0 2>/dev/null | grep -q ckj-; then
            echo "$n"
        fi
    done
}

step "starting the job on $NODE1 as ckpt job $JOBID (own cgroup and namespaces, address $ADDR)"
# The program runs from the work dir: the job cannot see the node's /tmp,
# where a checkout may live. Its descriptors are 0-2 only (run closes the
# rest).
cp "$JOB" "$WORK/stencil"
(cd "$WORK" && on 1 "$AGENT" run --job "$JOBID" --hostname demo-job --net \
    --veth br0 --address "$ADDR/24" --detach --pidfile "$WORK/job.pid" \
    -- "$WORK/stencil" >"$WORK/job.out" 2>&1 </dev/null)
JOBPID=$(cat "$WORK/job.pid")
sleep 1.5
step "job root: pid $JOBPID, pid $(inner "$JOBPID") inside; eth0 $(jobaddr "$JOBPID") on $(where); at: $(tail -n1 "$WORK/job.out")"

step "checkpointing job $JOBID with $NODE1's agent into the shared directory (freeze, dump, kill)"
on 1 "$AGENT" dump --tree "$JOBPID" --images "$SHARED/$JOBID"
JOBPID=
step "images: $(du -sh "$SHARED/$JOBID" | cut -f1) in $(ls "$SHARED/$JOBID" | wc -l) files"

step "destroying $NODE1 (its namespaces, its address, everything on it)"
"$LABCTL" destroy-node "$LAB" 1 >/dev/null

step "can $NODE2 restore it? (ckpt-agent check --images)"
on 2 "$AGENT" check --images "$SHARED/$JOBID" | sed 's/^/          /'

step "restoring the job with $NODE2's agent (ckpt-agent restore --detach)"
JOBPID=$(on 2 "$AGENT" restore --images "$SHARED/$JOBID" --detach)
step "restored: pid $JOBPID, pid $(inner "$JOBPID") inside, threads: $(ls /proc/$JOBPID/task | wc -l); eth0 $(jobaddr "$JOBPID") now on $(where)"

for _ in $(seq 600); do
    grep -q '^checksum' "$WORK/job.out" && break
    sleep 0.1
done
JOBPID=
got=$(grep '^checksum' "$WORK/job.out" || echo "no result")
step "restored job finished: $got"
if [ "$got" = "$want" ]; then
    step "PASS: the job moved from $NODE1 to $NODE2 mid-run and computed the same result as the uninterrupted run"
else
    step "FAIL: expected '$want', got '$got'"
    cat "$WORK/job.out"
    exit 1
fi
