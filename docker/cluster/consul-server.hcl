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

# Connect and ACLs: docker/consul-acl.hcl. `snet-init consul-acl` bootstraps the ACLs and
# sets each server's own agent token through its API.
