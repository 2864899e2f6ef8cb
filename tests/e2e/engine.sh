# Sourced by tests/e2e/cluster.sh and tests/e2e/swarm.sh (after compose.sh, which installs
# Docker and Compose v2): start dockerd if no engine answers (its pid in dockerd_pid, for the
# caller to stop), and build the images that are missing as compose.sh does (the local base,
# Consul, MariaDB and Redis from docker/build-local-images.sh, then snet's two targets).
# Needs say, die and work from the caller.
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

