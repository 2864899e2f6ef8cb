#!/usr/bin/env bash
# End-to-end test of compose.cluster.yml (snet across "hosts": three Consul servers, a Consul
# client agent per host, the services in their host's network namespace), under faults with
# traffic through the monolith the whole time: tests/e2e/cluster.py does the work, this script
# gets it an engine and the images.
#
#   tests/e2e/cluster.sh                  # as root; after tests/e2e/compose.sh it reuses its images
#   KEEP_DOCKERD=1 tests/e2e/cluster.sh   # leave a dockerd this script started running
#   tests/e2e/cluster.sh --keep           # leave the cluster up at the end (cluster.py's flags)
#
# It starts dockerd if no engine answers (and stops it at the end, only then), and builds the
# images it lacks as compose.sh does (docker/build-local-images.sh, then snet's two targets):
# nothing is pulled. The cluster is its own compose project (SNET_CLUSTER_PROJECT,
# snet-cluster-e2e) on its own network (SNET_CLUSTER_SUBNET, 172.30.240.0/24); the monolith,
# its admin listener and the operator's Consul agent are published on 127.0.0.1 only
# (SNET_HTTP_PORT 8090, SNET_ADMIN_PORT 8091, SNET_CONSUL_PORT 8590 here, so that a compose.yml
# stack on the usual ports can keep running). Traffic goes to those ports and, inside the
# cluster network, between the containers it made.
#
# The last line is `cluster: N passed, N failed`; the exit status is non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

export SNET_BASE_IMAGE="${SNET_BASE_IMAGE:-snet-base:bookworm}"
export SNET_CONSUL_IMAGE="${SNET_CONSUL_IMAGE:-snet-consul:local}"
export SNET_MYSQL_IMAGE="${SNET_MYSQL_IMAGE:-snet-mariadb:local}"
export SNET_REDIS_IMAGE="${SNET_REDIS_IMAGE:-snet-redis:local}"
export SNET_SERVER_IMAGE="${SNET_SERVER_IMAGE:-snet-server:e2e}"
export SNET_CHAT_IMAGE="${SNET_CHAT_IMAGE:-snet-chat:e2e}"
export SNET_HTTP_PORT="${SNET_CLUSTER_HTTP_PORT:-8090}"
export SNET_ADMIN_PORT="${SNET_CLUSTER_ADMIN_PORT:-8091}"
export SNET_CONSUL_PORT="${SNET_CLUSTER_CONSUL_PORT:-8590}"
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

readonly STARTED_AT=${SECONDS}
dockerd_pid=""
work="$(mktemp -d)"

say() { printf '== cluster e2e [%3ds] %s\n' "$((SECONDS - STARTED_AT))" "$*"; }
die() {
    printf '== cluster e2e: error: %s\n' "$*" >&2
    printf 'cluster: 0 passed, 1 failed\n'
    exit 1
}

finish() {
    local status=$?
    if [[ -n ${dockerd_pid} && ${KEEP_DOCKERD:-0} != 1 ]]; then
        say "stopping the dockerd this run started (pid ${dockerd_pid})"
        kill -TERM "${dockerd_pid}" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "${dockerd_pid}" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -rf "${work}"
    say "finished in $((SECONDS - STARTED_AT)) s (exit ${status})"
    exit "${status}"
}
trap finish EXIT

[[ ${EUID} -eq 0 ]] || die "run this as root (dockerd, debootstrap)"
command -v docker >/dev/null || die "no docker CLI: run tests/e2e/compose.sh first (it installs Docker and Compose)"
docker compose version >/dev/null 2>&1 || die "no Docker Compose v2: run tests/e2e/compose.sh first"

# shellcheck source=tests/e2e/engine.sh
source tests/e2e/engine.sh

say "tests/e2e/cluster.py (project ${SNET_CLUSTER_PROJECT:-snet-cluster-e2e}, monolith on 127.0.0.1:${SNET_HTTP_PORT})"
python3 tests/e2e/cluster.py "$@"
