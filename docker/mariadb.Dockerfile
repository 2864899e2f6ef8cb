# MariaDB for machines that cannot pull mariadb:11: Debian 12's mariadb-server (10.11) on the
# local base image, with an entry point that honours the official image's settings that
# compose.yml uses (MARIADB_ROOT_PASSWORD_FILE and the other MARIADB_* settings,
# /docker-entrypoint-initdb.d/*.sql and *.sh with docker_process_sql) and a `healthcheck.sh`
# that takes the official one's arguments. Its mysql user has the official image's ids
# (999:999), made before the package would pick its own, so compose.yml's `user:` suits both.
# Built by docker/build-local-images.sh; compose.yml uses it when SNET_MYSQL_IMAGE names it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# policy-rc.d: the packages' scripts must not start the server while the image builds.
RUN groupadd --system --gid 999 mysql \
    && useradd --system --uid 999 --gid 999 --home-dir /nonexistent --no-create-home \
        --shell /bin/false mysql \
    && printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
    && apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends \
        mariadb-server mariadb-client \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/sbin/policy-rc.d \
    && rm -rf /var/lib/mysql && install -d -o mysql -g mysql -m 0750 /var/lib/mysql \
    && install -d -o mysql -g mysql -m 0755 /run/mysqld /docker-entrypoint-initdb.d
COPY mariadb-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
COPY mariadb-healthcheck.sh /usr/local/bin/healthcheck.sh
USER 999:999
VOLUME /var/lib/mysql
EXPOSE 3306
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["mariadbd"]
