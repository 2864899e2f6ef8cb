# Consul for machines that cannot pull hashicorp/consul: the binary of Debian 11's consul
# package (the same pinned .deb and sha256 as scripts/install-deps) on the local base image.
# Built by docker/build-local-images.sh; compose.yml uses it when SNET_CONSUL_IMAGE names it.
# Its entry point is `consul`, so compose.yml's `agent ...` command suits both images, and
# its user is the official image's (uid 100, gid 1000), so compose.yml's `user:` does too.
# curl: for compose.yml's health check (the official image has it).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS fetch
ARG CONSUL_DEB_URL=http://deb.debian.org/debian/pool/main/c/consul/consul_1.8.7%2bdfsg1-2%2bb3_amd64.deb
ARG CONSUL_DEB_SHA256=e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9
RUN python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], "/tmp/consul.deb")' \
        "${CONSUL_DEB_URL}" \
    && echo "${CONSUL_DEB_SHA256}  /tmp/consul.deb" | sha256sum --check --quiet \
    && dpkg-deb -x /tmp/consul.deb /tmp/consul \
    && install -m 0755 /tmp/consul/usr/bin/consul /usr/local/bin/consul \
    && rm -rf /tmp/consul.deb /tmp/consul

FROM ${BASE_IMAGE}
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends curl \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/*
COPY --from=fetch /usr/local/bin/consul /usr/local/bin/consul
RUN groupadd --system --gid 1000 consul \
    && useradd --system --uid 100 --gid 1000 --home-dir /consul --create-home \
        --shell /usr/sbin/nologin consul \
    && mkdir -p /consul/data /consul/config && chown -R consul:consul /consul
USER 100:1000
WORKDIR /consul
EXPOSE 8500 8600/udp 8301 8300
ENTRYPOINT ["consul"]
CMD ["agent", "-dev", "-client", "0.0.0.0"]
