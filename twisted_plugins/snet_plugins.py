"""The twistd plugins of snet: ``twistd snet-chat`` and ``twistd snet-server``.

Each one names the ``tap`` module that builds its service; that module is imported only
when its plugin runs, so listing plugins stays cheap.
"""

from twisted.application.service import ServiceMaker

snet_chat = ServiceMaker(
    "snet chat",
    "snet.chat.tap",
    "The snet dialogs (chat) service: one instance, registered with Consul.",
    "snet-chat",
)
snet_server = ServiceMaker(
    "snet server",
    "snet.server.tap",
    "The snet monolith: the public JSON API.",
    "snet-server",
)
