#!/bin/sh
# Starts a Consul agent of compose.cluster.yml with what lives in secret files: the gossip
# encryption key (every agent) and, on a client agent, its ACL token. Both go into a config
# file on the container's tmpfs, readable by the agent only, never on the command line.
#   consul-start.sh [consul agent flags...]
set -eu
umask 077
conf=/tmp/snet-secrets.json
key=$(cat /run/secrets/gossip/key)
if [ -r /run/secrets/agent/consul-agent-token ]; then
    token=$(cat /run/secrets/agent/consul-agent-token)
    printf '{"encrypt": "%s", "acl": {"tokens": {"agent": "%s"}}}\n' "$key" "$token" >"$conf"
else
    printf '{"encrypt": "%s"}\n' "$key" >"$conf"
fi
exec consul agent -config-file="$conf" "$@"
