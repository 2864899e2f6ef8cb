# Redis for machines that cannot pull redis:7: Debian 12's redis-server (7.0) on the local
# base image. Built by docker/build-local-images.sh; compose.yml uses it when
# SNET_REDIS_IMAGE names it. Its user has the official image's ids (999:999), made before the
# package would pick its own, so compose.yml's `user:` suits both images.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# policy-rc.d: the packages' scripts must not start the server while the image builds.
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
    && printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
    && apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends redis-server \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/sbin/policy-rc.d
USER 999:999
WORKDIR /var/lib/redis
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "yes", "--save", "", "--appendonly", "no"]
