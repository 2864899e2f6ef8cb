#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when this container's service answers 200 on /health.

The port comes from SNET_HEALTH_URL if set, else from SNET_LISTEN (``tcp:9001``,
``tcp:port=8080:interface=0.0.0.0``, ...), which the image sets for each part. Standard
library only; it contacts nothing but this container's own port.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request

TIMEOUT = 2.5


def health_url(environ: dict[str, str]) -> str:
    """The URL of this container's /health, from SNET_HEALTH_URL or SNET_LISTEN."""
    if environ.get("SNET_HEALTH_URL"):
        return environ["SNET_HEALTH_URL"]
    listen = environ.get("SNET_LISTEN", "")
    kind, _, rest = listen.partition(":")
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"cannot tell the port from SNET_LISTEN={listen!r}")
    host, port = "127.0.0.1" if kind == "tcp" else "[::1]", ""
    for position, part in enumerate(re.split(r"(?<!\\):", rest)):
        key, equals, value = part.replace("\\:", ":").partition("=")
        if not equals and position == 0:
            port = key
        elif key == "port":
            port = value
        elif key == "interface" and value not in ("", "0.0.0.0", "::"):  # noqa: S104
            host = f"[{value}]" if ":" in value else value
    if not port.isdigit():
        raise ValueError(f"no port in SNET_LISTEN={listen!r}")
    return f"http://{host}:{port}/health"


def main() -> int:
    try:
        url = health_url(dict(os.environ))
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310
            print(response.status, response.read(200).decode("utf-8", "replace"))
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as e:
        print(e.code, e.read(200).decode("utf-8", "replace"))
    except (OSError, ValueError) as e:
        print(f"unhealthy: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
