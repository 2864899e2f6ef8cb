#!/usr/bin/env bash
# Build, on a machine that cannot pull from any container registry, the images that
# compose.yml otherwise pulls: a Debian 12 base with Python 3 (debootstrap + docker import),
# and Consul, MariaDB and Redis built on it from Debian's packages.
#
#   docker/build-local-images.sh            # debootstrap only if the base is missing
#   REBUILD=1 docker/build-local-images.sh  # debootstrap the base again too
#
# Then run compose.yml with them (the same variables tests/e2e/compose.sh sets):
#   SNET_BASE_IMAGE=snet-base:bookworm SNET_CONSUL_IMAGE=snet-consul:local \
#   SNET_MYSQL_IMAGE=snet-mariadb:local SNET_REDIS_IMAGE=snet-redis:local docker compose up -d
#
# The base trusts the CA certificates this host added in /usr/local/share/ca-certificates
# (for a TLS-intercepting proxy, say), so that pip and apt inside image builds work where the
# host's do. They go into the local image only; nothing of them is written to the repository.
#
# Needs root (debootstrap), docker with a running engine, and debootstrap.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), the image names
# SNET_BASE_IMAGE, SNET_CONSUL_IMAGE, SNET_MYSQL_IMAGE, SNET_REDIS_IMAGE (defaults above).
set -euo pipefail
cd "$(dirname "$0")/.."

readonly DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly BASE_IMAGE="${SNET_BASE_IMAGE:-snet-base:bookworm}"
readonly CONSUL_IMAGE="${SNET_CONSUL_IMAGE:-snet-consul:local}"
readonly MYSQL_IMAGE="${SNET_MYSQL_IMAGE:-snet-mariadb:local}"
readonly REDIS_IMAGE="${SNET_REDIS_IMAGE:-snet-redis:local}"
readonly REBUILD="${REBUILD:-0}"

say() { printf 'build-local-images: %s\n' "$*"; }
die() { printf 'build-local-images: error: %s\n' "$*" >&2; exit 1; }

have_image() { [[ ${REBUILD} != 1 ]] && docker image inspect "$1" >/dev/null 2>&1; }

rootfs_parent=""
cleanup() { if [[ -n ${rootfs_parent} ]]; then rm -rf "${rootfs_parent}"; fi; }
trap cleanup EXIT

build_base() {
    if have_image "${BASE_IMAGE}"; then
        say "${BASE_IMAGE}: present"
        return
    fi
    command -v debootstrap >/dev/null || die "debootstrap is not installed"
    [[ ${EUID} -eq 0 ]] || die "debootstrap needs root"
    rootfs_parent="$(mktemp -d)"
    local rootfs="${rootfs_parent}/rootfs"
    say "${BASE_IMAGE}: debootstrap bookworm (minbase, python3, python3-venv, ca-certificates)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "${rootfs}" "${DEBIAN_MIRROR}" >"${rootfs_parent}/debootstrap.log" 2>&1 \
        || { tail -n 30 "${rootfs_parent}/debootstrap.log" >&2; die "debootstrap failed"; }
    cat >"${rootfs}/etc/apt/sources.list" <<SOURCES
deb ${DEBIAN_MIRROR} bookworm main
deb ${DEBIAN_MIRROR} bookworm-updates main
SOURCES
    # Trust the host's extra CAs inside the local image only (see the header).
    local extra=(/usr/local/share/ca-certificates/*.crt)
    if [[ -e ${extra[0]} ]]; then
        say "${BASE_IMAGE}: adding this host's ${#extra[@]} extra CA certificate(s)"
        cp "${extra[@]}" "${rootfs}/usr/local/share/ca-certificates/"
        chroot "${rootfs}" update-ca-certificates >/dev/null 2>&1
    fi
    chroot "${rootfs}" apt-get clean
    rm -f "${rootfs}/etc/resolv.conf" "${rootfs}/etc/hostname"
    rm -rf "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/usr/share/doc/* "${rootfs}"/usr/share/man/* \
        "${rootfs}"/usr/share/info/* "${rootfs}"/var/log/*.log "${rootfs}"/var/cache/debconf/*-old
    say "${BASE_IMAGE}: docker import"
    tar -C "${rootfs}" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "${BASE_IMAGE}" >/dev/null
    rm -rf "${rootfs_parent}"
    rootfs_parent=""
}

# Always built: Docker's layer cache makes an unchanged one take a moment, and a changed
# Dockerfile is never missed. The legacy builder, since Debian's engine has no buildx.
build_service() {
    local image="$1" dockerfile="$2" log
    log="$(mktemp)"
    say "${image}: docker build -f ${dockerfile}"
    if ! DOCKER_BUILDKIT=0 docker build --build-arg "BASE_IMAGE=${BASE_IMAGE}" \
        -f "${dockerfile}" -t "${image}" docker/ >"${log}" 2>&1; then
        tail -n 40 "${log}" >&2
        rm -f "${log}"
        die "docker build of ${image} failed"
    fi
    rm -f "${log}"
}

build_base
build_service "${CONSUL_IMAGE}" docker/consul.Dockerfile
build_service "${MYSQL_IMAGE}" docker/mariadb.Dockerfile
build_service "${REDIS_IMAGE}" docker/redis.Dockerfile
say "done"
