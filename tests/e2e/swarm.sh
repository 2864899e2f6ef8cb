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

readonly E2E_NAME=swarm
export SNET_HTTP_PORT="${SNET_SWARM_HTTP_PORT:-8095}"
export SNET_ADMIN_PORT="${SNET_SWARM_ADMIN_PORT:-8096}"
export SNET_CONSUL_PORT="${SNET_SWARM_CONSUL_PORT:-8595}"

# shellcheck source=tests/e2e/engine.sh
source tests/e2e/engine.sh

say "tests/e2e/swarm.py (stack ${SNET_SWARM_STACK:-snet-swarm}, monolith on 127.0.0.1:${SNET_HTTP_PORT})"
python3 tests/e2e/swarm.py "$@"
