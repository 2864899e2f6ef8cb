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

readonly E2E_NAME=cluster
readonly E2E_COMPOSE=1
export SNET_HTTP_PORT="${SNET_CLUSTER_HTTP_PORT:-8090}"
export SNET_ADMIN_PORT="${SNET_CLUSTER_ADMIN_PORT:-8091}"
export SNET_CONSUL_PORT="${SNET_CLUSTER_CONSUL_PORT:-8590}"

# shellcheck source=tests/e2e/engine.sh
source tests/e2e/engine.sh

say "tests/e2e/cluster.py (project ${SNET_CLUSTER_PROJECT:-snet-cluster-e2e}, monolith on 127.0.0.1:${SNET_HTTP_PORT})"
python3 tests/e2e/cluster.py "$@"
