# compose.yml's Consul: one server that keeps its state (the catalogue, the ACLs, the Connect
# CA) in the consul-data volume, so a restart keeps the ACL tokens docker/snet-init.py made.
# Production runs three or five servers and a client agent per host (docs/deploying.md).
node_name        = "consul"
data_dir         = "/consul/data"
server           = true
bootstrap_expect = 1
client_addr      = "0.0.0.0"
ui               = true
disable_update_check = true

# Production timing (the default, 5, suits small machines): a restarted server elects itself
# leader in about a second instead of ten.
performance {
  raft_multiplier = 1
}

# Connect's built-in CA: leaf certificates for snet-server and snet-chat, and intentions.
connect {
  enabled = true
}

# No token, no access: every request needs a token whose policy allows it. The tokens are
# made on first start by `snet-init consul-acl` (compose.yml's consul-acl-init), which also
# sets the agent's own token; enable_token_persistence keeps that one across restarts.
acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
}
