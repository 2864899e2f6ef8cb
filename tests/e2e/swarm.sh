#!/usr/bin/env bash
# End-to-end test of deploy/swarm/stack.yml: the same images on a single-node Docker Swarm
# advertised on 127.0.0.1, a start-first `docker service update --image` and a `docker
# service scale chat=5` under traffic (tests/e2e/swarm.py does the work; this script gets it
# an engine and the images, as tests/e2e/cluster.sh does).
#
#   tests/e2e/swarm.sh                  # as root, on an engine that is in no swarm
#   KEEP_DOCKERD=1 tests/e2e/swarm.sh   # leave a dockerd this script started running
#
# It leaves the swarm (`docker swarm leave --force`) and removes the stack's volumes at the
# end, on failure too, and refuses to run on an engine that is already in a swarm. The
# monolith, its admin listener and Consul are published in host mode on SNET_SWARM_HTTP_PORT
# (8095), SNET_SWARM_ADMIN_PORT (8096) and SNET_SWARM_CONSUL_PORT (8595); the test sends to
# them on 127.0.0.1 only. The last line is `swarm: N passed, N failed`.
set -euo pipefail
cd "$(dirname "$0")/../.."

export SNET_BASE_IMAGE="${SNET_BASE_IMAGE:-snet-base:bookworm}"
export SNET_CONSUL_IMAGE="${SNET_CONSUL_IMAGE:-snet-consul:local}"
export SNET_MYSQL_IMAGE="${SNET_MYSQL_IMAGE:-snet-mariadb:local}"
export SNET_REDIS_IMAGE="${SNET_REDIS_IMAGE:-snet-redis:local}"
export SNET_SERVER_IMAGE="${SNET_SERVER_IMAGE:-snet-server:e2e}"
export SNET_CHAT_IMAGE="${SNET_CHAT_IMAGE:-snet-chat:e2e}"
export SNET_HTTP_PORT="${SNET_SWARM_HTTP_PORT:-8095}"
export SNET_ADMIN_PORT="${SNET_SWARM_ADMIN_PORT:-8096}"
export SNET_CONSUL_PORT="${SNET_SWARM_CONSUL_PORT:-8595}"
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

readonly STARTED_AT=${SECONDS}
dockerd_pid=""
work="$(mktemp -d)"

say() { printf '== swarm e2e [%3ds] %s\n' "$((SECONDS - STARTED_AT))" "$*"; }
die() {
    printf '== swarm e2e: error: %s\n' "$*" >&2
    printf 'swarm: 0 passed, 1 failed\n'
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
command -v docker >/dev/null || die "no docker CLI: run tests/e2e/compose.sh first (it installs Docker)"

# shellcheck source=tests/e2e/engine.sh
source tests/e2e/engine.sh

say "tests/e2e/swarm.py (stack ${SNET_SWARM_STACK:-snet-swarm}, monolith on 127.0.0.1:${SNET_HTTP_PORT})"
python3 tests/e2e/swarm.py "$@"
