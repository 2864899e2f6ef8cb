#!/usr/bin/env bash
# healthcheck.sh of docker/mariadb.Dockerfile: healthy once the real server answers on its TCP
# port (the private server of the first start listens on none). Takes, and ignores, the
# official image's arguments (--connect --innodb_initialized), so that compose.yml's check
# suits both images. It logs in as the rightless user the entry point made; mariadb-admin ping
# succeeds even when a login is refused: the server answered.
readonly CNF=/var/lib/mysql/.my-healthcheck.cnf
if [[ -r ${CNF} ]]; then
    defaults=(--defaults-file="${CNF}")
else
    defaults=(--no-defaults)
fi
exec mariadb-admin "${defaults[@]}" --protocol=tcp --host=127.0.0.1 --port=3306 \
    --connect-timeout=2 ping >/dev/null
