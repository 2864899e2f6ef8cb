#!/usr/bin/env bash
# End-to-end test of the compose deployment, as a user runs it, on a Debian 12 machine where
# no container registry can be reached (it pulls nothing):
#
#   0. installs what is missing: Debian's docker.io and debootstrap, and Docker Compose v2 (the
#      CLI plugin from Debian 13's docker-compose package, checked against its sha256); starts
#      dockerd if no engine answers (and stops it at the end, only then); builds the local
#      base, Consul, MariaDB and Redis images (docker/build-local-images.sh: debootstrap only
#      when the base image is missing) and snet's images with `docker compose build`;
#   1. `docker compose up --wait` with three chat instances, then the trust checks: every
#      container hardened (read-only root, no capabilities, no-new-privileges, memory and
#      pids limits, not root); the secret files readable by their consumers' group only;
#      Consul refuses anonymous reads and registrations and each role's token what its role
#      does not need; the chat MySQL user cannot read the monolith's tables; Redis refuses
#      unauthenticated commands and keeps each service to its keys; no secret in `docker
#      compose config`, the images' history, the containers' settings or the logs; and a
#      restart of Consul keeps its ACLs;
#   2. registers users and sends dialog messages through the monolith on 127.0.0.1:8080:
#      the three chat containers share them evenly (X-Snet-Chat-Instance; within 1);
#   3. `docker stop` of one chat container during a steady stream of sends: no failed
#      request, Consul no longer lists it, the two others share the traffic;
#   4. `docker compose up --scale chat=4`: the init steps run again and keep every secret and
#      token, the new container gets its share, every acknowledged message is in MySQL,
#      and the services' logs show no refusal by Redis, MySQL or Consul;
#   5. `docker compose down -v`, on failure too.
#
# Step 2 also has a container on the compose network that is not the monolith ask every
# chat instance for dialogs, in plaintext and over TLS without a client certificate: no
# answer may carry dialog data (the chat instances speak Consul Connect's mutual TLS).
#
# It exits non-zero on any failed request or uneven share. Traffic goes only to 127.0.0.1
# (the published ports) and, inside the compose network, between the containers it made.
# Run as root (apt-get, debootstrap, dockerd). Environment: SNET_HTTP_PORT (8080),
# SNET_ADMIN_PORT (8081) and SNET_CONSUL_PORT (8500), the host ports to publish; KEEP_DOCKERD=1 leaves a dockerd this
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
export SNET_ADMIN_PORT="${SNET_ADMIN_PORT:-8081}"
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

# A check made of shell commands: check_that "WHAT" COMMAND [ARGS...]
check_that() {
    local what="$1"
    shift
    if "$@"; then
        say "ok: ${what}"
        passed=$((passed + 1))
    else
        say "FAILED: ${what}"
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
for port in "${SNET_HTTP_PORT}" "${SNET_ADMIN_PORT}" "${SNET_CONSUL_PORT}"; do
    port_free "${port}" || die "127.0.0.1:${port} is in use (set SNET_HTTP_PORT / SNET_ADMIN_PORT / SNET_CONSUL_PORT)"
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

# The secrets, as the init steps wrote them: NAME=VALUE lines, in this run's private work
# directory (mode 0700, removed at the end). users.acl holds only hashes.
read_secrets() {
    compose run --rm --no-deps -T consul-acl-init sh -c \
        'cd /secrets && for f in */*; do printf "%s=%s\n" "$f" "$(cat "$f")"; done' \
        | grep -v '^server/\|^chat/' >"$1"
    compose run --rm --no-deps -T secrets-init sh -c \
        'cd /secrets && for f in */*; do [ "${f##*/}" = users.acl ] || printf "%s=%s\n" "$f" "$(cat "$f")"; done' \
        >>"$1"
    chmod 0600 "$1"
}
secret() { sed -n "s|^$1=||p" "${work}/secrets.env"; }
read_secrets "${work}/secrets.env"
export CONSUL_HTTP_TOKEN SNET_E2E_CHAT_TOKEN SNET_E2E_SERVER_TOKEN
CONSUL_HTTP_TOKEN="$(secret operator/consul-token)"
SNET_E2E_CHAT_TOKEN="$(secret chat/consul-token)"
SNET_E2E_SERVER_TOKEN="$(secret server/consul-token)"
check wait --instances 3

say "1b. trust: hardening, secrets, Consul ACLs, MySQL and Redis users"

hardened() {
    local bad=0 id line
    for id in $(compose ps -q); do
        line="$(docker inspect -f '{{.Name}} ro={{.HostConfig.ReadonlyRootfs}} caps={{.HostConfig.CapDrop}}+{{.HostConfig.CapAdd}} opts={{.HostConfig.SecurityOpt}} mem={{.HostConfig.Memory}} pids={{.HostConfig.PidsLimit}} user={{.Config.User}}' "${id}")"
        echo "   ${line}"
        [[ ${line} == *" ro=true caps=[ALL]+[] opts=[no-new-privileges:true] "* ]] || bad=1
        [[ ${line} != *" mem=0 "* && ${line} != *" pids=0 "* && ${line} != *" pids=<nil> "* ]] || bad=1
        [[ ${line} =~ user=[0-9]+: && ${line} != *" user=0:"* ]] || bad=1
    done
    return "${bad}"
}
check_that "every running container: read-only root, no capabilities, no-new-privileges, memory and pids limits, a non-root user" hardened

secret_files_private() {
    local listing
    listing="$(compose run --rm --no-deps -T secrets-init sh -c 'stat -c "%a %u:%g %n" /secrets/* /secrets/*/*')"
    listing+=$'\n'"$(compose run --rm --no-deps -T consul-acl-init sh -c 'stat -c "%a %u:%g %n" /secrets/operator /secrets/operator/*')"
    echo "${listing}" | sed 's/^/   /'
    ! echo "${listing}" | grep -vE '^(750 0:[0-9]+ /secrets/[a-z]+|440 0:[0-9]+ /secrets/[a-z]+/[a-z.-]+)$'
}
check_that "secret files: root-owned, mode 0440 for their readers' group only, in 0750 directories" secret_files_private

check consul-acl --instances 3

mysql_as() {
    local user="$1" file="$2" query="$3"
    compose exec -T mysql sh -c \
        "MYSQL_PWD=\"\$(cat /run/secrets/snet-mysql/${file})\" mariadb -u${user} -h127.0.0.1 -N -e '${query}'" 2>&1
}
mysql_least_privilege() {
    local out bad=0
    out="$(mysql_as snet_chat chat-password 'SELECT COUNT(*) FROM snet.users')" && bad=1
    echo "   snet_chat: SELECT FROM snet.users -> ${out}"
    [[ ${out} == *"denied"* ]] || bad=1
    out="$(mysql_as snet_chat chat-password 'SELECT COUNT(*) FROM snet.user_tokens')" && bad=1
    echo "   snet_chat: SELECT FROM snet.user_tokens -> ${out}"
    out="$(mysql_as snet_server server-password 'SELECT COUNT(*) FROM snet_chat.chat_messages')" && bad=1
    echo "   snet_server: SELECT FROM snet_chat.chat_messages -> ${out}"
    out="$(mysql_as snet_chat chat-password 'SELECT COUNT(*) FROM snet_chat.chat_messages')" || bad=1
    echo "   snet_chat: SELECT FROM snet_chat.chat_messages -> ${out}"
    return "${bad}"
}
check_that "MySQL: the chat user cannot read users or tokens, the monolith's user cannot read messages, each reads its own" mysql_least_privilege

# From a throwaway container on the compose network, holding the chat instances' secrets.
redis_refuses() {
    local out
    out="$(docker run --rm --network "${PROJECT}_default" --read-only --cap-drop ALL \
        --security-opt no-new-privileges:true --user 10001:10001 \
        -v "${PROJECT}_chat-secrets:/s:ro" "${SNET_REDIS_IMAGE}" sh -c '
            echo "anonymous PING: $(redis-cli -h redis ping 2>&1)"
            echo "anonymous GET: $(redis-cli -h redis get snet:feed:1 2>&1)"
            export REDISCLI_AUTH="$(cat /s/redis-password)"
            echo "snet-chat GET snet:feed:1: $(redis-cli --no-auth-warning -h redis --user snet-chat get snet:feed:1 2>&1)"
            echo "snet-chat CONFIG GET: $(redis-cli --no-auth-warning -h redis --user snet-chat config get requirepass 2>&1)"
            echo "snet-chat HLEN snet:unread:1: $(redis-cli --no-auth-warning -h redis --user snet-chat -n 1 hlen snet:unread:1 2>&1)"
        ')"
    echo "${out}" | sed 's/^/   /'
    [[ $(grep -c 'NOAUTH' <<<"${out}") -eq 2 && $(grep -c 'NOPERM' <<<"${out}") -eq 2 ]] \
        && grep -qE '^snet-chat HLEN snet:unread:1: [0-9]+$' <<<"${out}"
}
check_that "Redis: unauthenticated commands refused; the chat user kept to its keys and out of CONFIG" redis_refuses

no_secret_leaks() {
    local haystack="${work}/haystack" image id
    cut -d= -f2- "${work}/secrets.env" | grep -v '^$' >"${work}/needles"
    [[ $(wc -l <"${work}/needles") -ge 10 ]] || { echo "   too few secrets read"; return 1; }
    {
        compose config
        for image in "${SNET_SERVER_IMAGE}" "${SNET_CHAT_IMAGE}" "${SNET_CONSUL_IMAGE}" \
            "${SNET_MYSQL_IMAGE}" "${SNET_REDIS_IMAGE}" "${SNET_BASE_IMAGE}"; do
            docker history --no-trunc "${image}"
            docker image inspect "${image}"
        done
        for id in $(compose ps -a -q); do docker inspect "${id}"; done
        compose logs --no-color
    } >"${haystack}" 2>&1
    echo "   searched $(wc -c <"${haystack}") bytes for $(wc -l <"${work}/needles") secrets"
    ! grep -qF -f "${work}/needles" "${haystack}"
}
check_that "no secret in docker compose config, the images' history and settings, the containers' settings or logs" no_secret_leaks

say "restarting Consul: its ACLs, tokens and intentions are in its volume"
compose restart consul >"${work}/restart.log" 2>&1 || { cat "${work}/restart.log" >&2; die "restart failed"; }
check wait --instances 3
check consul-acl --instances 3
# While Consul elects itself again, it resolves no token ("ACL not found"): only refusals
# after this point count below.
settled_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# 2. Even share

say "2. registering users, then sequential sends through 127.0.0.1:${SNET_HTTP_PORT}"
traffic users --state "${state}" --count 4
check even --state "${state}" --sends 90 --instances 3

# No dialog data for anything but the monolith: the chat instances speak Connect TLS only.
addresses=""
for id in $(compose ps -q chat); do addresses+="${addresses:+,}$(container_address "${id}"):9001"; done
say "2b. a container on the compose network that is not the monolith asks the chat instances for dialogs"
rogue_dialogs() {
    docker run --rm --network "${PROJECT}_default" --read-only --cap-drop ALL \
        --security-opt no-new-privileges:true \
        -v "${PWD}/tests/e2e/traffic.py:/e2e/traffic.py:ro" -v "${work}:/e2e/state:ro" \
        "${SNET_BASE_IMAGE}" python3 /e2e/traffic.py rogue-dialogs \
        --state /e2e/state/users.json --addresses "${addresses}"
}
check_that "no dialog data for a container that is not the monolith" rogue_dialogs

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
read_secrets "${work}/secrets-again.env"
init_steps_kept_everything() {
    local acl_runs
    acl_runs="$(compose logs --no-color consul-acl-init | grep -c 'ACLs and intentions in place')"
    echo "   consul-acl-init finished ${acl_runs} times"
    [[ ${acl_runs} -eq 2 ]] \
        && compose logs --no-color secrets-init | grep -q 'secrets present: kept' \
        && cmp -s "${work}/secrets.env" "${work}/secrets-again.env"
}
check_that "a second docker compose up ran both init steps again, and they kept every secret and token" \
    init_steps_kept_everything
check wait --instances 4
check even --state "${state}" --sends 120 --instances 4 --must-include "$(container_address "${new}")"
check verify --state "${state}"
# A restarted chat instance's first registration is sometimes answered "ACL not found" while
# consul-acl-init (run again by the same `up`) sets the agent's token; the instance retries
# and registers (the `wait --instances 4` above proves it). Those retried registrations are
# left out; any other refusal counts.
no_refusals_logged() {
    local refusals
    refusals="$(compose logs --no-color --since "${settled_at}" server chat \
        | grep -E 'NOPERM|NOAUTH|WRONGPASS|Access denied|Permission denied|ACL not found' \
        | grep -vE '"could not register [^"]*: ACL not found; retrying in' || true)"
    [[ -z ${refusals} ]] || { echo "${refusals}" | cut -c1-300 | head -5 | sed 's/^/   /'; return 1; }
}
check_that "the services were refused nothing by Redis, MySQL or Consul since it settled (their logs)" \
    no_refusals_logged

# 5. Teardown: the EXIT trap runs `docker compose down -v`.
say "5. all checks passed"
