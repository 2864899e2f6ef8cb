# MariaDB for machines that cannot pull mariadb:11: Debian 12's mariadb-server (10.11) on the
# local base image, with an entry point that honours the official image's settings that
# compose.yml uses (MARIADB_ROOT_PASSWORD, MARIADB_DATABASE, MARIADB_USER, MARIADB_PASSWORD,
# /docker-entrypoint-initdb.d/*.sql) and a `healthcheck.sh` that takes the official one's
# arguments. Built by docker/build-local-images.sh; compose.yml uses it when
# SNET_MYSQL_IMAGE names it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# policy-rc.d: the packages' scripts must not start the server while the image builds.
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
    && apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends \
        mariadb-server mariadb-client \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/sbin/policy-rc.d \
    && rm -rf /var/lib/mysql && install -d -o mysql -g mysql -m 0750 /var/lib/mysql \
    && install -d -o mysql -g mysql -m 0755 /run/mysqld /docker-entrypoint-initdb.d
COPY mariadb-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
COPY mariadb-healthcheck.sh /usr/local/bin/healthcheck.sh
USER mysql
VOLUME /var/lib/mysql
EXPOSE 3306
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["mariadbd"]
