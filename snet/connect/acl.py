"""The Consul ACL rules each snet role needs, and nothing more (HCL, as Consul 1.8 reads it).

- **chat** (every chat instance): ``service:write`` on its own service only: register and
  deregister itself, get its Connect leaf, and ask the agent to authorize callers of it.
  It reads no other service and no node.
- **monolith**: ``service:write`` on its own service name, which it never registers but
  needs for its Connect leaf; ``service:read`` on the chat service and ``node:read`` to
  follow the chat instances' health.

The CA roots need no token at all. The deployment's bootstrap makes one token per role from
these rules (wiring pending: see docs/trust.md).
"""

from __future__ import annotations

__all__ = ["chat_rules", "monolith_rules"]


def chat_rules(service: str = "snet-chat") -> str:
    """The rules of a chat instance's token."""
    return f'service "{service}" {{ policy = "write" }}\n'


def monolith_rules(service: str = "snet-server", chat_service: str = "snet-chat") -> str:
    """The rules of the monolith's token."""
    return (
        f'service "{service}" {{ policy = "write" }}\n'
        f'service "{chat_service}" {{ policy = "read" }}\n'
        'node_prefix "" { policy = "read" }\n'
    )
