#!/usr/bin/env bash
# End-to-end test of the compose deployment, as a user runs it, on a Debian 12 machine where
# no container registry can be reached (it pulls nothing):
#
#   0. installs what is missing: Debian's docker.io and debootstrap, and Docker Compose v2 (the
#      CLI plugin from Debian 13's docker-compose package, checked against its sha256); starts
#      dockerd if no engine answers (and stops it at the end, only then); builds the local
#      base, Consul, MariaDB and Redis images (docker/build-local-images.sh: debootstrap only
#      when the base image is missing) and snet's images with `docker compose build`;
#   1. `docker compose up --wait` with three chat instances;
#   2. registers users and sends dialog messages through the monolith on 127.0.0.1:8080:
#      the three chat containers share them evenly (X-Snet-Chat-Instance; within 1);
#   3. `docker stop` of one chat container during a steady stream of sends: no failed
#      request, Consul no longer lists it, the two others share the traffic;
#   4. `docker compose up --scale chat=4`: the new container gets its share, and every
#      acknowledged message is in MySQL;
#   5. `docker compose down -v`, on failure too.
#
# It exits non-zero on any failed request or uneven share. Traffic goes only to 127.0.0.1
# (the published ports) and, inside the compose network, between the containers it made.
# Run as root (apt-get, debootstrap, dockerd). Environment: SNET_HTTP_PORT (8080) and
# SNET_CONSUL_PORT (8500), the host ports to publish; KEEP_DOCKERD=1 leaves a dockerd this
# script started running (for a quicker next run).
set -euo pipefail
cd "$(dirname "$0")/../.."

readonly PROJECT=snet-e2e
readonly COMPOSE_DEB_URL="http://deb.debian.org/debian/pool/main/d/docker-compose/docker-compose_2.26.1-4_amd64.deb"
readonly COMPOSE_DEB_SHA256="47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea"
readonly CLI_PLUGINS=/usr/local/lib/docker/cli-plugins
readonly POLICY_RC_D=/usr/sbin/policy-rc.d

export SNET_BASE_IMAGE=snet-base:bookworm
export SNET_CONSUL_IMAGE=snet-consul:local
export SNET_MYSQL_IMAGE=snet-mariadb:local
export SNET_REDIS_IMAGE=snet-redis:local
export SNET_SERVER_IMAGE=snet-server:e2e
export SNET_CHAT_IMAGE=snet-chat:e2e
export SNET_HTTP_PORT="${SNET_HTTP_PORT:-8080}"
export SNET_CONSUL_PORT="${SNET_CONSUL_PORT:-8500}"
# Debian's engine has no buildx: the classic builder.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

readonly STARTED_AT=${SECONDS}
work="$(mktemp -d)"
state="${work}/users.json"
dockerd_pid=""
stack_up=0
status=1
passed=0
failed=0

say() { printf '== e2e [%3ds] %s\n' "$((SECONDS - STARTED_AT))" "$*"; }
die() { printf '== e2e: error: %s\n' "$*" >&2; exit 1; }
compose() { docker compose -p "${PROJECT}" -f compose.yml "$@"; }
traffic() { python3 tests/e2e/traffic.py "$@"; }
# A check: counted in the closing "N passed, N failed" line.
check() {
    if traffic "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        return 1
    fi
}

finish() {
    status=$?
    set +e
    if [[ ${stack_up} -eq 1 ]]; then
        if [[ ${status} -ne 0 ]]; then
            say "failed; the containers and the last of their logs:"
            compose ps -a
            compose logs --no-color --tail 25 server chat 2>&1 | cut -c1-400
        fi
        say "docker compose down -v"
        compose down -v --remove-orphans --timeout 30 >"${work}/down.log" 2>&1 \
            || cat "${work}/down.log"
    fi
    if [[ -n ${dockerd_pid} && ${KEEP_DOCKERD:-0} != 1 ]]; then
        say "stopping the dockerd this run started (pid ${dockerd_pid})"
        kill -TERM "${dockerd_pid}" 2>/dev/null
        for _ in $(seq 100); do kill -0 "${dockerd_pid}" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -rf "${work}"
    if [[ ${status} -eq 0 ]]; then
        say "passed in $((SECONDS - STARTED_AT)) s"
    else
        say "FAILED (exit ${status}) after $((SECONDS - STARTED_AT)) s"
        [[ ${failed} -gt 0 ]] || failed=1
    fi
    printf 'e2e: %d passed, %d failed\n' "${passed}" "${failed}"
    exit "${status}"
}
trap finish EXIT

[[ ${EUID} -eq 0 ]] || die "run this as root (apt-get, debootstrap, dockerd)"

# 0. Tools, engine, images

apt_install() {
    local missing=() package
    for package in "$@"; do
        [[ "$(dpkg-query -W -f='${Status}' "${package}" 2>/dev/null)" == "install ok installed" ]] \
            || missing+=("${package}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    say "apt-get install ${missing[*]}"
    # As scripts/install-deps does: no daemon starts from a package script.
    local had_policy=0
    if [[ -e ${POLICY_RC_D} ]]; then had_policy=1; cp -p "${POLICY_RC_D}" "${work}/policy-rc.d"; fi
    printf '#!/bin/sh\nexit 101\n' >"${POLICY_RC_D}" && chmod 0755 "${POLICY_RC_D}"
    local rc=0
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends \
            "${missing[@]}"; } >"${work}/apt.log" 2>&1; then
        rc=1
    fi
    if [[ ${had_policy} -eq 1 ]]; then cp -p "${work}/policy-rc.d" "${POLICY_RC_D}"; else rm -f "${POLICY_RC_D}"; fi
    [[ ${rc} -eq 0 ]] || { tail -n 30 "${work}/apt.log" >&2; die "apt-get install failed"; }
}

install_compose() {
    if docker compose version >/dev/null 2>&1; then
        return
    fi
    say "installing Docker Compose v2 from Debian 13's docker-compose package"
    curl -fsSL --retry 3 -o "${work}/compose.deb" "${COMPOSE_DEB_URL}"
    echo "${COMPOSE_DEB_SHA256}  ${work}/compose.deb" | sha256sum --check --quiet \
        || die "docker-compose .deb does not have the expected sha256"
    dpkg-deb -x "${work}/compose.deb" "${work}/compose"
    install -D -m 0755 "${work}/compose/usr/libexec/docker/cli-plugins/docker-compose" \
        "${CLI_PLUGINS}/docker-compose"
}

start_engine() {
    if docker info >/dev/null 2>&1; then
        say "a Docker engine is running"
        return
    fi
    say "starting dockerd (log: ${work}/dockerd.log)"
    dockerd >"${work}/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 150); do
        docker info >/dev/null 2>&1 && return
        kill -0 "${dockerd_pid}" 2>/dev/null || break
        sleep 0.2
    done
    tail -n 30 "${work}/dockerd.log" >&2
    die "dockerd did not start"
}

# Bound as a server binds it (SO_REUSEADDR), so that connections of an earlier run still in
# TIME_WAIT do not count.
port_free() {
    python3 - "$1" 2>/dev/null <<'PY'
import socket
import sys

with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
PY
}

apt_install docker.io debootstrap curl ca-certificates
install_compose
say "$(docker compose version)"
start_engine

# A run that died before its teardown may have left the project behind.
compose down -v --remove-orphans --timeout 30 >/dev/null 2>&1 || true
for port in "${SNET_HTTP_PORT}" "${SNET_CONSUL_PORT}"; do
    port_free "${port}" || die "127.0.0.1:${port} is in use (set SNET_HTTP_PORT / SNET_CONSUL_PORT)"
done

docker/build-local-images.sh
# The build stage gets a tag of its own: it stays as the cache of the next run (wheels of the
# dependencies), and the one it replaces becomes untagged and is pruned below.
say "docker build --target build (snet-build:cache), then docker compose build server chat"
{ docker build --target build -t snet-build:cache --build-arg "BASE_IMAGE=${SNET_BASE_IMAGE}" \
    -f docker/Dockerfile . && compose build server chat; } >"${work}/build.log" 2>&1 \
    || { tail -n 40 "${work}/build.log" >&2; die "building snet's images failed"; }
docker image prune --force --filter label=snet.stage >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
    | grep -E "^(snet-base:bookworm|${SNET_CONSUL_IMAGE}|${SNET_MYSQL_IMAGE}|${SNET_REDIS_IMAGE}|${SNET_SERVER_IMAGE}|${SNET_CHAT_IMAGE}) " \
    | sed 's/^/   image /'

container_address() {
    docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"
}

# 1. Up

say "1. docker compose up --wait (consul, mysql, redis, server, chat x3)"
stack_up=1
compose up -d --no-build --pull never --wait >"${work}/up.log" 2>&1 \
    || { cat "${work}/up.log" >&2; die "docker compose up failed"; }
compose ps --format '   {{.Name}}: {{.Status}}'
check wait --instances 3

# 2. Even share

say "2. registering users, then sequential sends through 127.0.0.1:${SNET_HTTP_PORT}"
traffic users --state "${state}" --count 4
check even --state "${state}" --sends 90 --instances 3

# 3. One chat container stops during a stream of sends

victim="$(compose ps -q chat | sed -n 1p)"
victim_name="$(docker inspect -f '{{.Name}}' "${victim}")"
victim_name="${victim_name#/}"
say "3. docker stop ${victim_name} during a steady stream of sends"
check stop-during-stream --state "${state}" --container "${victim_name}" \
    --address "$(container_address "${victim}")" --instances 2
check even --state "${state}" --sends 60 --instances 2

# 4. Scale to four

before="$(compose ps -a -q chat | sort)"
say "4. docker compose up --scale chat=4 (the stopped one starts again, one is new)"
compose up -d --no-build --pull never --no-recreate --scale chat=4 --wait >"${work}/up.log" 2>&1 \
    || { cat "${work}/up.log" >&2; die "docker compose up --scale chat=4 failed"; }
new="$(comm -13 <(echo "${before}") <(compose ps -a -q chat | sort) | sed -n 1p)"
[[ -n ${new} ]] || die "no new chat container after --scale chat=4"
new_name="$(docker inspect -f '{{.Name}}' "${new}")"
say "new chat container: ${new_name#/} at $(container_address "${new}")"
check wait --instances 4
check even --state "${state}" --sends 120 --instances 4 --must-include "$(container_address "${new}")"
check verify --state "${state}"

# 5. Teardown: the EXIT trap runs `docker compose down -v`.
say "5. all checks passed"
