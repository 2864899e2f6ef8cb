# compose.cluster.yml's Consul servers: three, Raft, each keeping its state in its own volume.
# The node name comes from the command line (-node), the gossip key from
# docker/cluster/consul-start.sh.
data_dir             = "/consul/data"
server               = true
bootstrap_expect     = 3
retry_join           = ["consul-1", "consul-2", "consul-3"]
client_addr          = "0.0.0.0"
ui                   = true
disable_update_check = true

performance {
  raft_multiplier = 1
}

connect {
  enabled = true
}

# The same ACLs as compose.yml's server (docker/consul.hcl): default deny, tokens made by
# `snet-init consul-acl`, which also sets each server's own agent token through its API.
acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
}
