# Sourced by tests/e2e/cluster.sh and tests/e2e/swarm.sh (after compose.sh, which installs
# Docker and Compose v2), with E2E_NAME (cluster, swarm) set and SNET_HTTP_PORT,
# SNET_ADMIN_PORT and SNET_CONSUL_PORT exported: the images' names, say/die, an EXIT trap
# that stops a dockerd this run started (unless KEEP_DOCKERD=1) and says how long the run
# took; then starts dockerd if no engine answers, and builds the images that are missing as
# compose.sh does (the local base, Consul, MariaDB and Redis from
# docker/build-local-images.sh, then snet's two targets). Set E2E_COMPOSE=1 when the test
# needs Docker Compose v2.

export SNET_BASE_IMAGE="${SNET_BASE_IMAGE:-snet-base:bookworm}"
export SNET_CONSUL_IMAGE="${SNET_CONSUL_IMAGE:-snet-consul:local}"
export SNET_MYSQL_IMAGE="${SNET_MYSQL_IMAGE:-snet-mariadb:local}"
export SNET_REDIS_IMAGE="${SNET_REDIS_IMAGE:-snet-redis:local}"
export SNET_SERVER_IMAGE="${SNET_SERVER_IMAGE:-snet-server:e2e}"
export SNET_CHAT_IMAGE="${SNET_CHAT_IMAGE:-snet-chat:e2e}"
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

readonly STARTED_AT=${SECONDS}
dockerd_pid=""
work="$(mktemp -d)"

say() { printf '== %s e2e [%3ds] %s\n' "${E2E_NAME}" "$((SECONDS - STARTED_AT))" "$*"; }
die() {
    printf '== %s e2e: error: %s\n' "${E2E_NAME}" "$*" >&2
    printf '%s: 0 passed, 1 failed\n' "${E2E_NAME}"
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
if [[ ${E2E_COMPOSE:-0} == 1 ]]; then
    docker compose version >/dev/null 2>&1 || die "no Docker Compose v2: run tests/e2e/compose.sh first"
fi

if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: ${work}/dockerd.log)"
    dockerd >"${work}/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 150); do
        docker info >/dev/null 2>&1 && break
        kill -0 "${dockerd_pid}" 2>/dev/null || break
        sleep 0.2
    done
    docker info >/dev/null 2>&1 || { tail -n 30 "${work}/dockerd.log" >&2; die "dockerd did not start"; }
fi

have() { docker image inspect "$1" >/dev/null 2>&1; }
if ! have "${SNET_BASE_IMAGE}" || ! have "${SNET_CONSUL_IMAGE}" || ! have "${SNET_MYSQL_IMAGE}" \
    || ! have "${SNET_REDIS_IMAGE}"; then
    say "building the local base, Consul, MariaDB and Redis images"
    docker/build-local-images.sh
fi
for target in server chat; do
    image="SNET_${target^^}_IMAGE"
    if ! have "${!image}"; then
        say "docker build --target ${target} -t ${!image}"
        docker build -q --target "${target}" -t "${!image}" --build-arg "BASE_IMAGE=${SNET_BASE_IMAGE}" \
            -f docker/Dockerfile . >/dev/null
    fi
done

