# compose.cluster.yml's client agents: one per host, joined to the servers. The services of
# the host share the agent's network namespace and reach it on 127.0.0.1:8500 only, as on a
# real machine. Node name (-node), gossip key and the agent's token come from
# docker/cluster/consul-start.sh.
data_dir             = "/consul/data"
server               = false
retry_join           = ["consul-1", "consul-2", "consul-3"]
client_addr          = "127.0.0.1"
disable_update_check = true

# Leaf certificates and authorizations for the services of this host (the CA is on the
# servers).
connect {
  enabled = true
}

acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
}
