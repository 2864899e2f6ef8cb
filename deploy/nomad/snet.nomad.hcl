# snet on Nomad: the monolith and the chat service, on hosts that each run a Consul client
# agent (127.0.0.1:8500) and Docker. MySQL and Redis are not in this job (run them as you run
# databases; their addresses are variables below).
#
# NOT RUN HERE: Nomad cannot be installed on the machines this project is built on. The file
# is parsed and checked against what the services read by tests/unit/test_nomad_job.py.
# Before using it:   nomad job validate deploy/nomad/snet.nomad.hcl
#                    nomad job plan -var 'image_tag=...' deploy/nomad/snet.nomad.hcl
#
# Registration: the chat instances register THEMSELVES in Consul (Connect-native, with their
# own HTTPS check), exactly as in compose, because their stop order depends on it: on
# SIGTERM an instance deregisters, waits for the monolith to notice, stops listening, then
# drains. A Nomad-managed Consul service would be removed by Nomad on its own schedule, and
# would be a second registration of the same instance. Nomad's own service blocks below use
# provider = "nomad" (Nomad's built-in catalogue, not Consul) for one purpose: a check on the
# admin listener's /health that deployments (canaries, auto_revert) wait on.
#
# Secrets (Consul tokens, MySQL and Redis passwords) come from Nomad variables into each
# task's secrets/ directory, and the services read them from files (the *_FILE variables),
# as in compose: nothing secret in the job, the environment or the logs. Put them with e.g.
#   nomad var put nomad/jobs/snet/chat/chat consul_token=... mysql_password=... redis_password=...
#   nomad var put nomad/jobs/snet/server/server consul_token=... mysql_password=... redis_password=...
# The tokens are the ones docker/snet-init.py makes (policies snet-chat and snet-server).

variable "image_tag" {
  type        = string
  description = "Tag of the snet-server and snet-chat images to run."
}

variable "registry" {
  type    = string
  default = ""
}

variable "mysql_host" {
  type = string
}

variable "redis_host" {
  type = string
}

variable "chat_count" {
  type    = number
  default = 3
}

variable "server_count" {
  type    = number
  default = 2
}

job "snet" {
  datacenters = ["dc1"]
  type        = "service"

  # One at a time, a canary first: the new version serves next to the old one until its
  # check passes, then the rest roll; a deployment that does not get healthy is reverted.
  update {
    max_parallel      = 1
    canary            = 1
    auto_promote      = true
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "5s"
    healthy_deadline  = "2m"
    progress_deadline = "5m"
    stagger           = "10s"
  }

  group "chat" {
    count = var.chat_count

    # One instance per host: a host lost takes one instance with it.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    # Host networking: the instance reaches its host's Consul agent on 127.0.0.1:8500 and
    # advertises the host's address, as on a machine without Nomad.
    network {
      mode = "host"
      port "api" {}
      port "admin" {}
    }

    service {
      provider = "nomad"
      name     = "snet-chat-admin"
      port     = "admin"
      check {
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "chat" {
      driver = "docker"

      config {
        image        = "${var.registry}snet-chat:${var.image_tag}"
        network_mode = "host"
        readonly_rootfs = true
        cap_drop     = ["ALL"]
        security_opt = ["no-new-privileges:true"]
        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false
          tmpfs_options {
            size = 16777216
          }
        }
      }

      # SIGTERM: deregister, wait SNET_DEREGISTER_GRACE, stop listening, drain for up to
      # SNET_DRAIN_TIMEOUT; kill_timeout gives it all of that and more before SIGKILL.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      # The admin listener on the host's address: Nomad checks its /health there (keep the
      # port closed to other hosts).
      env {
        SNET_LISTEN              = "tcp:${NOMAD_PORT_api}"
        SNET_ADMIN_LISTEN        = "tcp:${NOMAD_PORT_admin}:interface=${NOMAD_IP_admin}"
        SNET_HEALTH_URL          = "http://${NOMAD_IP_admin}:${NOMAD_PORT_admin}/health"
        SNET_ADVERTISE           = "${NOMAD_IP_api}:${NOMAD_PORT_api}"
        SNET_INSTANCE_ID         = "snet-chat-${NOMAD_ALLOC_ID}"
        SNET_SERVICE_NAME        = "snet-chat"
        CONSUL_HTTP_ADDR         = "http://127.0.0.1:8500"
        CONSUL_HTTP_TOKEN_FILE   = "${NOMAD_SECRETS_DIR}/consul-token"
        SNET_MYSQL               = "mysql://snet_chat@${var.mysql_host}:3306/snet_chat"
        SNET_MYSQL_PASSWORD_FILE = "${NOMAD_SECRETS_DIR}/mysql-password"
        SNET_REDIS               = "redis://snet-chat@${var.redis_host}:6379/1"
        SNET_REDIS_PASSWORD_FILE = "${NOMAD_SECRETS_DIR}/redis-password"
        SNET_DRAIN_TIMEOUT       = "10"
        SNET_DEREGISTER_GRACE    = "1"
        SNET_CHECK_INTERVAL      = "1"
        SNET_DEREGISTER_AFTER    = "60"
      }

      template {
        destination = "${NOMAD_SECRETS_DIR}/consul-token"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/snet/chat/chat\" }}{{ .consul_token }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/mysql-password"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/snet/chat/chat\" }}{{ .mysql_password }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/redis-password"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/snet/chat/chat\" }}{{ .redis_password }}{{ end }}"
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }

  group "server" {
    count = var.server_count

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    # The public port is the same on every host (a load balancer in front spreads over the
    # hosts); the admin listener stays on the host's 127.0.0.1.
    network {
      mode = "host"
      port "http" {
        static = 8080
      }
      port "admin" {
        static = 8081
      }
    }

    service {
      provider = "nomad"
      name     = "snet-server"
      port     = "http"
      check {
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "2s"
      }
    }

    task "server" {
      driver = "docker"

      config {
        image        = "${var.registry}snet-server:${var.image_tag}"
        network_mode = "host"
        readonly_rootfs = true
        cap_drop     = ["ALL"]
        security_opt = ["no-new-privileges:true"]
        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false
          tmpfs_options {
            size = 16777216
          }
        }
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      env {
        SNET_LISTEN              = "tcp:${NOMAD_PORT_http}"
        SNET_ADMIN_LISTEN        = "tcp:${NOMAD_PORT_admin}:interface=127.0.0.1"
        SNET_HEALTH_URL          = "http://127.0.0.1:${NOMAD_PORT_admin}/health"
        SNET_CHAT_SERVICE        = "snet-chat"
        CONSUL_HTTP_ADDR         = "http://127.0.0.1:8500"
        CONSUL_HTTP_TOKEN_FILE   = "${NOMAD_SECRETS_DIR}/consul-token"
        SNET_MYSQL               = "mysql://snet_server@${var.mysql_host}:3306/snet"
        SNET_MYSQL_PASSWORD_FILE = "${NOMAD_SECRETS_DIR}/mysql-password"
        SNET_REDIS               = "redis://snet-server@${var.redis_host}:6379/0"
        SNET_REDIS_PASSWORD_FILE = "${NOMAD_SECRETS_DIR}/redis-password"
        SNET_DRAIN_TIMEOUT       = "10"
      }

      template {
        destination = "${NOMAD_SECRETS_DIR}/consul-token"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/snet/server/server\" }}{{ .consul_token }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/mysql-password"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/snet/server/server\" }}{{ .mysql_password }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/redis-password"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/snet/server/server\" }}{{ .redis_password }}{{ end }}"
      }

      resources {
        cpu    = 500
        memory = 384
      }
    }
  }
}
