"""Friendships and posts in MySQL (the truth the feed cache is rebuilt from).

The store raises its own exceptions (``SelfFriendship``, ``NoSuchFriend``, ``NoSuchPost``,
``NotAuthor``), which the app answers.

A friendship is one-directional, as in the original OTUS project: "A befriends B" means A
follows B, and B's posts show in A's feed. Post ids grow with time, so everything here orders
posts by id, newest (highest) first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from attrs import define, frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from snet.storage import run_with_retry

log = Logger(namespace="snet.server.social")

FEED_SIZE = 1000
"""How many of the newest posts a feed holds."""
FRIENDS_LIMIT = 500
"""The most friends ``Social.friends`` lists."""


class SelfFriendship(Exception):
    """A user asked to befriend or unfriend themself."""


class NoSuchFriend(Exception):
    """The user to befriend or unfriend does not exist."""


class NoSuchPost(Exception):
    """There is no post with the id given."""


class NotAuthor(Exception):
    """A user asked to change or delete a post someone else wrote."""


@frozen
class Post:
    """A stored post."""

    id: int
    author_id: int
    text: str

    def to_json(self) -> dict[str, Any]:
        """The public API's ``Post``: ids as decimal strings."""
        return {"id": str(self.id), "text": self.text, "author_user_id": str(self.author_id)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Post:
        """The inverse of ``to_json``."""
        return cls(id=int(body["id"]), author_id=int(body["author_user_id"]), text=body["text"])


def _post(row: tuple[Any, ...]) -> Post:
    id_, author_id, text = row
    return Post(id=int(id_), author_id=int(author_id), text=str(text))


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


def _require_other_user(txn: adbapi.Transaction, user_id: int, friend_id: int) -> None:
    if user_id == friend_id:
        raise SelfFriendship("one cannot befriend oneself")
    txn.execute("SELECT 1 FROM users WHERE id = %s", (friend_id,))
    if txn.fetchone() is None:
        raise NoSuchFriend("no such user")


def _befriend(txn: adbapi.Transaction, user_id: int, friend_id: int, now: datetime) -> bool:
    _require_other_user(txn, user_id, friend_id)
    txn.execute(
        "INSERT INTO friendships (user_id, friend_id, created_at) VALUES (%s, %s, %s)"
        " ON DUPLICATE KEY UPDATE user_id = user_id",
        (user_id, friend_id, now),
    )
    return bool(txn.rowcount == 1)


def _unfriend(txn: adbapi.Transaction, user_id: int, friend_id: int) -> bool:
    _require_other_user(txn, user_id, friend_id)
    txn.execute(
        "DELETE FROM friendships WHERE user_id = %s AND friend_id = %s", (user_id, friend_id)
    )
    return bool(txn.rowcount == 1)


def _create_post(txn: adbapi.Transaction, author_id: int, text: str, now: datetime) -> Post:
    txn.execute(
        "INSERT INTO posts (author_id, text, created_at, updated_at) VALUES (%s, %s, %s, %s)",
        (author_id, text, now, now),
    )
    return Post(id=int(txn.lastrowid), author_id=author_id, text=text)


def _own_post(txn: adbapi.Transaction, author_id: int, post_id: int) -> None:
    txn.execute("SELECT author_id FROM posts WHERE id = %s FOR UPDATE", (post_id,))
    row = txn.fetchone()
    if row is None:
        raise NoSuchPost("no such post")
    if int(row[0]) != author_id:
        raise NotAuthor("only its author may change a post")


def _update_post(
    txn: adbapi.Transaction, author_id: int, post_id: int, text: str, now: datetime
) -> Post:
    _own_post(txn, author_id, post_id)
    txn.execute("UPDATE posts SET text = %s, updated_at = %s WHERE id = %s", (text, now, post_id))
    return Post(id=post_id, author_id=author_id, text=text)


def _delete_post(txn: adbapi.Transaction, author_id: int, post_id: int) -> Post:
    _own_post(txn, author_id, post_id)
    txn.execute("SELECT id, author_id, text FROM posts WHERE id = %s", (post_id,))
    post = _post(txn.fetchone())
    txn.execute("DELETE FROM posts WHERE id = %s", (post_id,))
    return post


def _get_post(txn: adbapi.Transaction, post_id: int) -> Post | None:
    txn.execute("SELECT id, author_id, text FROM posts WHERE id = %s", (post_id,))
    row = txn.fetchone()
    return None if row is None else _post(row)


def _posts(txn: adbapi.Transaction, post_ids: list[int]) -> dict[int, Post]:
    if not post_ids:
        return {}
    marks = ", ".join(["%s"] * len(post_ids))
    txn.execute(
        f"SELECT id, author_id, text FROM posts WHERE id IN ({marks})",  # noqa: S608
        tuple(post_ids),
    )
    return {post.id: post for post in map(_post, txn.fetchall())}


def _friends(txn: adbapi.Transaction, user_id: int, limit: int) -> list[int]:
    txn.execute(
        "SELECT friend_id FROM friendships WHERE user_id = %s ORDER BY friend_id LIMIT %s",
        (user_id, limit),
    )
    return [int(row[0]) for row in txn.fetchall()]


def _followers(txn: adbapi.Transaction, author_id: int, after: int, limit: int) -> list[int]:
    txn.execute(
        "SELECT user_id FROM friendships WHERE friend_id = %s AND user_id > %s"
        " ORDER BY user_id LIMIT %s",
        (author_id, after, limit),
    )
    return [int(row[0]) for row in txn.fetchall()]


_FEED = (
    " FROM friendships AS f JOIN posts AS p ON p.author_id = f.friend_id"
    " WHERE f.user_id = %s ORDER BY p.id DESC LIMIT %s"
)
FEED_IDS_SQL = "SELECT p.id" + _FEED
"""A feed's post ids, newest first: what a cache rebuild reads."""
FEED_PAGE_SQL = "SELECT p.id, p.author_id, p.text" + _FEED + " OFFSET %s"
"""A page of a feed straight from MySQL (when Redis is down)."""


def _feed_ids(txn: adbapi.Transaction, user_id: int, limit: int) -> list[int]:
    txn.execute(FEED_IDS_SQL, (user_id, limit))
    return [int(row[0]) for row in txn.fetchall()]


def _feed_page(txn: adbapi.Transaction, user_id: int, offset: int, limit: int) -> list[Post]:
    txn.execute(FEED_PAGE_SQL, (user_id, limit, offset))
    return [_post(row) for row in txn.fetchall()]


@define
class Social:
    """Friendships and posts in MySQL (the ``friendships`` and ``posts`` tables)."""

    pool: adbapi.ConnectionPool
    clock: IReactorTime

    def befriend(self, user_id: int, friend_id: int) -> Deferred[bool]:
        """*user_id* follows *friend_id* from now on; fires with whether that is new.

        :raises SelfFriendship: *friend_id* is *user_id*.
        :raises NoSuchFriend: *friend_id* is no user.
        """
        return run_with_retry(self.pool, _befriend, user_id, friend_id, self._now())

    def unfriend(self, user_id: int, friend_id: int) -> Deferred[bool]:
        """*user_id* no longer follows *friend_id*; fires with whether it did.

        :raises SelfFriendship: *friend_id* is *user_id*.
        :raises NoSuchFriend: *friend_id* is no user.
        """
        return run_with_retry(self.pool, _unfriend, user_id, friend_id)

    def create_post(self, author_id: int, text: str) -> Deferred[Post]:
        """Store a new post."""
        return run_with_retry(self.pool, _create_post, author_id, text, self._now())

    def update_post(self, author_id: int, post_id: int, text: str) -> Deferred[Post]:
        """Replace the text of *author_id*'s post *post_id*.

        :raises NoSuchPost: there is no such post.
        :raises NotAuthor: someone else wrote it.
        """
        return run_with_retry(self.pool, _update_post, author_id, post_id, text, self._now())

    def delete_post(self, author_id: int, post_id: int) -> Deferred[Post]:
        """Remove *author_id*'s post *post_id*; fires with the post as it was.

        :raises NoSuchPost: there is no such post.
        :raises NotAuthor: someone else wrote it.
        """
        return run_with_retry(self.pool, _delete_post, author_id, post_id)

    def get_post(self, post_id: int) -> Deferred[Post | None]:
        """The post *post_id*, or None."""
        return run_with_retry(self.pool, _get_post, post_id)

    def posts(self, post_ids: list[int]) -> Deferred[dict[int, Post]]:
        """{id: post} of those of *post_ids* that exist."""
        return run_with_retry(self.pool, _posts, list(post_ids))

    def friends(self, user_id: int, limit: int = FRIENDS_LIMIT) -> Deferred[list[int]]:
        """The first *limit* users *user_id* follows, by id."""
        return run_with_retry(self.pool, _friends, user_id, limit)

    def followers(self, author_id: int, *, after: int, limit: int) -> Deferred[list[int]]:
        """Up to *limit* followers of *author_id* with ids above *after*, in id order."""
        return run_with_retry(self.pool, _followers, author_id, after, limit)

    def feed_ids(self, user_id: int, limit: int = FEED_SIZE) -> Deferred[list[int]]:
        """The ids of the newest *limit* posts of the users *user_id* follows, newest first."""
        return run_with_retry(self.pool, _feed_ids, user_id, limit)

    def feed_page(self, user_id: int, offset: int, limit: int) -> Deferred[list[Post]]:
        """Posts *offset* to *offset* + *limit* of *user_id*'s feed, newest first."""
        return run_with_retry(self.pool, _feed_page, user_id, offset, limit)

    def _now(self) -> datetime:
        return _utc(self.clock.seconds())
