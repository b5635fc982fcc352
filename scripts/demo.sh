#!/usr/bin/env bash
# The demo: a simulated cluster of 4 nodes (ckpt-lab: a network and UTS
# namespace per node on a fabric bridge, a shared directory as the
# cluster's file system), a ckpt agent serving on each node, and ckpt-coord
# driving them. It launches the sample job jobs/stencil-tcp (a heat solver
# whose two ranks, on nodes 1 and 2, swap halo rows over TCP on addresses of
# their own), checkpoints it mid-run and stops it, destroys nodes 1 and 2,
# restarts the job on nodes 3 and 4 (same PIDs inside, same addresses, the
# TCP connection between the ranks carried over), and checks that its final
# result equals an uninterrupted run's. Prints each step with its time, and
# leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$PWD/target/release
AGENT=$BIN/ckpt-agent
COORD=$BIN/ckpt-coord
LABCTL=$BIN/ckpt-lab
# Not under /tmp: a job gets a private /tmp of its own.
WORK=$(mktemp -d /var/tmp/ckpt-demo.XXXXXX)
JOBID=demo-$$
JOBARGS=(--size 512 --iters 18000 --every 1800)
LAB=
AGENT_PIDS=()
cleanup() {
    for p in "${AGENT_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "$LAB" ] && "$LABCTL" down "$LAB" >/dev/null 2>&1 || true
    for cg in /sys/fs/cgroup/unified/ckpt /sys/fs/cgroup/ckpt /sys/fs/cgroup/freezer/ckpt; do
        for part in r0 r1; do
            for _ in 1 2 3 4 5; do
                [ -d "$cg/$JOBID.$part" ] || break
                rmdir "$cg/$JOBID.$part" 2>/dev/null || sleep 0.2
            done
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
indent() { sed 's/^/          /'; }

step "probing this machine's kernel (ckpt-agent check)"
$AGENT check >"$WORK/check.txt" || { cat "$WORK/check.txt"; exit 1; }
grep -E '^(ptrace_seize|clone3_set_tid|pagemap_scan|tcp_repair|veth) ' "$WORK/check.txt" | indent

step "reference: both ranks of stencil-tcp uninterrupted, on loopback"
"$BIN/stencil-tcp" --rank 1 --connect 127.0.0.1:7099 "${JOBARGS[@]}" >/dev/null &
"$BIN/stencil-tcp" --rank 0 --listen 127.0.0.1:7099 "${JOBARGS[@]}" >"$WORK/reference.out"
wait
want=$(grep '^checksum' "$WORK/reference.out")
step "reference result: $want"

step "bringing up a simulated cluster of 4 nodes (ckpt-lab up)"
eval "$("$LABCTL" up --nodes 4 2>/dev/null)"
read -r -a NODE <<<"$NODES"
read -r -a ADDR <<<"$ADDRESSES"
step "lab $LAB: nodes ${NODE[*]} on $SUBNET; the cluster's shared file system: $SHARED"

step "starting an agent on every node (ckpt-agent serve), with a fresh cluster key"
head -c 32 /dev/urandom >"$WORK/cluster.key"
chmod 600 "$WORK/cluster.key"
{
    echo "key = \"$WORK/cluster.key\""
    echo "store = \"$SHARED/store\""
    for i in 0 1 2 3; do
        printf '\n[[node]]\nname = "%s"\nagent = "%s:7707"\nnetns = "/run/netns/%s"\n' \
            "${NODE[$i]}" "${ADDR[$i]}" "${NODE[$i]}"
    done
} >"$WORK/cluster.toml"
for i in 0 1 2 3; do
    "$LABCTL" exec "$LAB" $((i + 1)) -- "$AGENT" serve --listen "${ADDR[$i]}:7707" \
        --node "${NODE[$i]}" --key "$WORK/cluster.key" --state-dir "$WORK/state-${NODE[$i]}" \
        >"$WORK/serve-$i.out" 2>"$WORK/serve-$i.err" </dev/null &
    AGENT_PIDS+=($!)
    disown $!
done
for i in 0 1 2 3; do
    for _ in $(seq 100); do [ -s "$WORK/serve-$i.out" ] && break; sleep 0.05; done
done
coord() { "$COORD" --config "$WORK/cluster.toml" "$@"; }

step "can every node run jobs? (ckpt-coord check)"
coord check | indent

# The program runs from the shared directory: every node sees it.
mkdir -p "$SHARED/bin"
cp "$BIN/stencil-tcp" "$SHARED/bin/"
JOBADDR0=198.18.$LAB.100
JOBADDR1=198.18.$LAB.101
args() { # rank, --listen/--connect
    printf '["--rank", "%s", "%s", "%s:7000"' "$1" "$2" "$JOBADDR0"
    printf ', "%s"' "${JOBARGS[@]}"
    printf ']'
}
cat >"$WORK/stencil-tcp.toml" <<EOF
# jobs/stencil-tcp: two ranks on two nodes, TCP between their own addresses.
job = "$JOBID"

[[part]]
name = "r0"
node = "${NODE[0]}"
command = "$SHARED/bin/stencil-tcp"
args = $(args 0 --listen)
[part.network]
address = "$JOBADDR0/24"

[[part]]
name = "r1"
node = "${NODE[1]}"
command = "$SHARED/bin/stencil-tcp"
args = $(args 1 --connect)
[part.network]
address = "$JOBADDR1/24"
EOF
step "launching job $JOBID (ckpt-coord launch): rank 0 on ${NODE[0]} at $JOBADDR0, rank 1 on ${NODE[1]} at $JOBADDR1"
coord launch "$WORK/stencil-tcp.toml" | indent
OUT=$SHARED/store/$JOBID/output/r0.log

for _ in $(seq 300); do
    [ "$(grep -c '^iter' "$OUT" 2>/dev/null || true)" -ge 3 ] && break
    sleep 0.1
done
step "mid-run: $(tail -n1 "$OUT")"

step "checkpointing job $JOBID on all its nodes at once, then stopping it (ckpt-coord checkpoint --stop)"
coord checkpoint "$JOBID" --stop | indent

step "destroying ${NODE[0]} and ${NODE[1]} (their agents, namespaces, addresses, everything on them)"
kill -9 "${AGENT_PIDS[0]}" "${AGENT_PIDS[1]}" 2>/dev/null || true
"$LABCTL" destroy-node "$LAB" 1 >/dev/null
"$LABCTL" destroy-node "$LAB" 2 >/dev/null

step "restarting job $JOBID on ${NODE[2]} and ${NODE[3]} (ckpt-coord restart: verify, check every node, restore held, release together)"
coord restart "$JOBID" --nodes "${NODE[2]},${NODE[3]}" | indent

for _ in $(seq 900); do
    grep -q '^checksum' "$OUT" 2>/dev/null && break
    sleep 0.1
done
got=$(grep '^checksum' "$OUT" || echo "no result")
step "restarted job finished: $got"
if [ "$got" = "$want" ]; then
    step "PASS: the job moved from ${NODE[0]},${NODE[1]} to ${NODE[2]},${NODE[3]} mid-run, its TCP connection with it, and computed the uninterrupted run's result"
else
    step "FAIL: expected '$want', got '$got'"
    cat "$OUT"
    exit 1
fi
