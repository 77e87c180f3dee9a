#!/usr/bin/env bash
# One Ray node per call; launch/slurm/posttrain.sbatch runs it through srun, inside the venv or the container.
#
#   ray-cluster.sh head HEAD_IP     start the head: GCS on RAY_PORT, dashboard on 0.0.0.0:RAY_DASHBOARD_PORT
#   ray-cluster.sh worker HEAD_IP   join the head at HEAD_IP:RAY_PORT
#   ray-cluster.sh count HEAD_IP    print how many nodes are alive (0 while the head is not up yet)
#
# head and worker block: `ray start --block` stays in the foreground so that the srun step owns the node's Ray
# processes, and signalling the step (or the job ending) stops them.
#
# Environment: RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), CPUS_PER_NODE and GPUS_PER_NODE (what Ray offers;
# default: detected), RAY_TEMP_DIR (default /tmp/ray; keep it on local disk, and short: Ray's socket paths must
# fit in 107 characters), RAY_START_ARGS (more `ray start` flags, split on spaces, e.g. "--object-store-memory=...").
set -euo pipefail

usage="usage: ray-cluster.sh head|worker|count HEAD_IP"
role=${1:?$usage}
head_ip=${2:?$usage}
port=${RAY_PORT:-6379}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}

opts=(--disable-usage-stats --block)
if [[ -n "${CPUS_PER_NODE:-}" ]]; then opts+=(--num-cpus="$CPUS_PER_NODE"); fi
if [[ -n "${GPUS_PER_NODE:-}" ]]; then opts+=(--num-gpus="$GPUS_PER_NODE"); fi
if [[ -n "${RAY_TEMP_DIR:-}" ]]; then opts+=(--temp-dir="$RAY_TEMP_DIR"); fi
read -r -a extra <<<"${RAY_START_ARGS:-}"
opts+=("${extra[@]}")

# Ray opens many files (sockets, object store); lift the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

case "$role" in
  head)
    # --node-ip-address: advertise the address the workers are given, not whatever Ray would guess.
    exec ray start --head --node-ip-address="$head_ip" --port="$port" \
      --dashboard-host=0.0.0.0 --dashboard-port="$dashboard_port" "${opts[@]}"
    ;;
  worker)
    exec ray start --address="$head_ip:$port" "${opts[@]}"
    ;;
  count)
    # Asks the dashboard (HTTP) rather than connecting a driver, so polling leaves no jobs behind.
    timeout 60 python - "http://$head_ip:$dashboard_port" <<'EOF' 2>/dev/null || echo 0
import sys

from ray.util.state import list_nodes

print(len(list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)))
EOF
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
