"""Schemathesis against a running monolith: snet's own document with every check, and the course
contract with the two checks it can carry.

snet publishes docs/openapi/snet-1.0.json: what the monolith really accepts and answers (id
patterns, lengths, required fields, every error). Schemathesis runs all its phases on it
(examples, coverage, fuzzing, stateful) with all its checks against a real ``twistd -n
snet-server`` with a chat instance, Consul, MariaDB and Redis, and finds nothing. The stateful
phase follows the document's links: a user is registered, logs in, and uses the token (feed,
posts, friends, dialogs, unread counts).

The course contract (docs/openapi/otus-highload-architect-1.2.0.json) declares ids as free
strings and every field optional, so schemathesis' data checks would take snet's right 400s for
faults; against it only two things must hold: no 5xx, and no answer outside its response
schemas.

Both runs are deterministic (``generation.deterministic``: the same cases in the same order) and
small (``max-examples`` in the configuration files in ``fuzzing/``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from snet.testing.monolith_stack import monolith_with_one_chat
from snet.testing.processes import http_json
from snet.testing.servers import ConsulAgent, MariaDB, Redis

pytestmark = pytest.mark.integration

DOCS = Path(__file__).parents[2] / "docs" / "openapi"
SNET_DOCUMENT = DOCS / "snet-1.0.json"
COURSE_CONTRACT = DOCS / "otus-highload-architect-1.2.0.json"
FUZZING = Path(__file__).parent / "fuzzing"

NOT_SERVED_YET: tuple[str, ...] = ()
"""Paths of the document that the monolith does not serve (none now)."""

RUN_TIMEOUT = 240
"""Seconds one schemathesis run may take (about 30 s on an idle 2-core machine)."""


@pytest.fixture(scope="module")
def base_url(consul_agent: ConsulAgent, mariadb: MariaDB, redis_server: Redis) -> Iterator[str]:
    with monolith_with_one_chat(
        consul_agent, mariadb, redis_server, name="fuzzing", chat_redis_db=8, server_redis_db=9
    ) as (url, _fleet):
        yield url


def schemathesis(
    document: Path,
    base_url: str,
    config: Path,
    arguments: Sequence[str],
    environment: dict[str, str],
    cwd: Path,
) -> str:
    """Run ``schemathesis run`` on *document* against *base_url*; its output, asserting that it
    found nothing (exit status 0)."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
        "run", str(document), "--url", base_url, "--workers", "1", *arguments,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, **environment},
        cwd=cwd,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def links_covered(output: str) -> int:
    """How many API links the stateful phase followed, as schemathesis reports it."""
    found = re.search(r"API Links:\s+(\d+) covered", output)
    assert found is not None, output
    return int(found.group(1))


def test_snet_document_holds_under_every_check_and_the_stateful_phase(
    base_url: str, tmp_path: Path
) -> None:
    exclusions = [argument for path in NOT_SERVED_YET for argument in ("--exclude-path", path)]
    output = schemathesis(
        SNET_DOCUMENT,
        base_url,
        FUZZING / "snet.toml",
        ["--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", *exclusions],
        {"SCHEMATHESIS_HOOKS": str(FUZZING / "hooks.py")},
        tmp_path,
    )
    assert "Stateful (in" in output, output
    assert links_covered(output) >= 5, output


def test_course_contract_sees_no_server_error_and_no_answer_outside_its_schemas(
    base_url: str, tmp_path: Path
) -> None:
    password = uuid.uuid4().hex
    status, _, body = http_json(
        "POST",
        f"{base_url}/user/register",
        {"first_name": "Course", "second_name": "Fuzzer", "birthdate": "1990-01-01",
         "password": password},
    )  # fmt: skip
    assert status == 200, body
    schemathesis(
        COURSE_CONTRACT,
        base_url,
        FUZZING / "course.toml",
        ["--checks", "not_a_server_error,response_schema_conformance"],
        {"SNET_FUZZ_USER_ID": str(body["user_id"]), "SNET_FUZZ_PASSWORD": password},
        tmp_path,
    )
