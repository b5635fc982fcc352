#!/usr/bin/env bash
# Installs the system packages ckpt's build, tests and demo need, when missing.
set -euo pipefail

need=()
# openmpi-bin and libopenmpi-dev for the MPI sample job (jobs/heat); libclang-dev
# because the mpi crate generates its bindings with bindgen at build time.
# slurmctld, slurmd, slurm-client and munge for the Slurm preemption tests
# (tests/src/slurm.rs runs them in a lab; nothing starts by itself).
for pkg in gcc make iproute2 nftables util-linux procps openmpi-bin libopenmpi-dev libclang-dev \
    slurmctld slurmd slurm-client munge; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "error: cargo (Rust stable) is not installed; install it with rustup first" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: ckpt's tests and demo checkpoint real processes and must run as root" >&2
    exit 1
fi
