# What every Consul agent of snet's deployments shares (compose.yml's server, and
# compose.cluster.yml's servers and client agents): Connect, and ACLs.

# Connect: the built-in CA on the servers issues leaf certificates for snet-server and
# snet-chat; every agent serves them to its host's services, and authorizes callers by the
# intentions.
connect {
  enabled = true
}

# No token, no access: every request needs a token whose policy allows it. The tokens are
# made on first start by `snet-init consul-acl` (docker/snet-init.py), which also sets the
# servers' own agent tokens; enable_token_persistence keeps those across restarts.
acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
}
