#!/usr/bin/env bash
# Entry point of docker/mariadb.Dockerfile: on the first start with an empty data directory,
# create the system tables, set the root password, create MARIADB_DATABASE and MARIADB_USER
# (with MARIADB_PASSWORD and all rights on that database), and run the files of
# /docker-entrypoint-initdb.d in name order (*.sql fed to the client, *.sh sourced, with
# docker_process_sql to run SQL as root, as the official image does), all on a private server
# that listens on no network port; then run the real server (the command, mariadbd by
# default). As in the official image, MARIADB_ROOT_PASSWORD_FILE and MARIADB_PASSWORD_FILE
# name files to read those passwords from.
set -euo pipefail

readonly DATADIR=/var/lib/mysql
readonly INIT_SOCKET=/run/mysqld/init.sock
readonly HEALTHCHECK_CNF="${DATADIR}/.my-healthcheck.cnf"

say() { printf 'docker-entrypoint: %s\n' "$*"; }

sql_string() { local s="${1//\\/\\\\}"; printf "'%s'" "${s//\'/\\\'}"; }
# shellcheck disable=SC2016 # backquotes quote SQL names
sql_name() { printf '`%s`' "${1//\`/\`\`}"; }

# VAR from VAR, or from the file VAR_FILE names (the official image's convention).
file_env() {
    local variable="$1" file_variable="${1}_FILE"
    if [[ -n ${!file_variable:-} ]]; then
        [[ -z ${!variable:-} ]] || { say "set ${variable} or ${file_variable}, not both"; exit 1; }
        printf -v "${variable}" '%s' "$(<"${!file_variable}")"
        export "${variable?}"
    fi
}

# SQL on stdin (or -e ...), run as root on the private server; for the *.sh init files.
docker_process_sql() {
    MYSQL_PWD="${MARIADB_ROOT_PASSWORD}" mariadb --no-defaults --socket="${INIT_SOCKET}" -uroot "$@"
}

initialize() {
    file_env MARIADB_ROOT_PASSWORD
    file_env MARIADB_PASSWORD
    : "${MARIADB_ROOT_PASSWORD:?set MARIADB_ROOT_PASSWORD or MARIADB_ROOT_PASSWORD_FILE}"
    say "initializing ${DATADIR}"
    mariadb-install-db --datadir="${DATADIR}" --skip-test-db \
        --auth-root-authentication-method=normal >/dev/null
    mariadbd --datadir="${DATADIR}" --skip-networking --socket="${INIT_SOCKET}" \
        --skip-log-bin &
    local pid=$! i
    for ((i = 0; i < 300; i++)); do
        mariadb-admin --socket="${INIT_SOCKET}" -uroot ping >/dev/null 2>&1 && break
        kill -0 "${pid}" 2>/dev/null || { say "the server stopped while initializing"; exit 1; }
        sleep 0.1
    done
    local client=(mariadb --no-defaults --socket="${INIT_SOCKET}" -uroot)
    # A login with no rights for healthcheck.sh, so that its checks log no refused logins.
    local health_password
    health_password="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    printf '[client]\nuser=healthcheck\npassword=%s\n' "${health_password}" >"${HEALTHCHECK_CNF}"
    chmod 0600 "${HEALTHCHECK_CNF}"
    {
        echo "CREATE USER 'healthcheck'@'127.0.0.1' IDENTIFIED BY '${health_password}';"
        echo "ALTER USER 'root'@'localhost' IDENTIFIED BY $(sql_string "${MARIADB_ROOT_PASSWORD}");"
        if [[ -n ${MARIADB_DATABASE:-} ]]; then
            echo "CREATE DATABASE IF NOT EXISTS $(sql_name "${MARIADB_DATABASE}") CHARACTER SET utf8mb4;"
        fi
        if [[ -n ${MARIADB_USER:-} ]]; then
            echo "CREATE USER $(sql_string "${MARIADB_USER}")@'%'" \
                "IDENTIFIED BY $(sql_string "${MARIADB_PASSWORD:?set MARIADB_PASSWORD}");"
            if [[ -n ${MARIADB_DATABASE:-} ]]; then
                echo "GRANT ALL ON $(sql_name "${MARIADB_DATABASE}").*" \
                    "TO $(sql_string "${MARIADB_USER}")@'%';"
            fi
        fi
    } | "${client[@]}"
    local file
    for file in /docker-entrypoint-initdb.d/*; do
        case "${file}" in
            *.sql) say "running ${file}"; docker_process_sql <"${file}" ;;
            # shellcheck disable=SC1090 # the init files are the deployment's
            *.sh) say "sourcing ${file}"; . "${file}" ;;
            *) [[ -e ${file} ]] && say "ignoring ${file} (only .sql and .sh files are run here)" ;;
        esac
    done
    MYSQL_PWD="${MARIADB_ROOT_PASSWORD}" mariadb-admin --no-defaults --socket="${INIT_SOCKET}" \
        -uroot shutdown
    wait "${pid}"
    say "initialized"
}

if [[ ${1:-} == mariadbd || ${1:-} == mysqld ]]; then
    [[ -d ${DATADIR}/mysql ]] || initialize
    shift
    exec mariadbd --datadir="${DATADIR}" --bind-address=0.0.0.0 --skip-name-resolve "$@"
fi
exec "$@"
