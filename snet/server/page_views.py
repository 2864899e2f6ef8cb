"""What the web pages look like: twisted.web.template tags, one function per page, and
``html_document`` that renders a page in the common layout.

Every text that comes from a user is passed to the tags as a string, which
twisted.web.template escapes; nothing here writes raw HTML. Forms carry the CSRF token
(``snet.server.web_session``) in a hidden field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any
from urllib.parse import urlencode

from attrs import frozen
from twisted.web.template import Tag, flattenString, tags

from snet.chat_contract import MAX_TEXT as MAX_MESSAGE_TEXT
from snet.server.accounts import User
from snet.server.social import Post
from snet.server.validation import MAX_BIOGRAPHY, MAX_CITY, MAX_NAME, MAX_POST_TEXT
from snet.server.web_session import CSRF_FIELD

PAGES_PREFIX = "/web"
"""Where the pages are, on the monolith's public listener."""


def url(path: str, **query: str | int) -> str:
    """The address of page *path* (relative to the pages' prefix) with *query*."""
    address = PAGES_PREFIX + path
    if query:
        address += "?" + urlencode(query)
    return address


@frozen
class Viewer:
    """Who looks at a page: the signed-in user (None for a visitor), the CSRF token of the
    browser's forms, and the unread count shown in the navigation."""

    user: User | None
    csrf: str
    unread: int | None = None
    session: bool = False
    """The browser has a session cookie that was not looked up (an error page: the error
    may be the database itself): the navigation of a signed-in person, without the parts
    that need the user."""


def full_name(user: User) -> str:
    return f"{user.profile.first_name} {user.profile.second_name}"


def csrf_field(viewer: Viewer) -> Tag:
    return tags.input(type="hidden", name=CSRF_FIELD, value=viewer.csrf)


def post_form(viewer: Viewer, action: str, *children: Any, **attributes: str) -> Tag:
    """A POST form to *action* carrying the CSRF token."""
    return tags.form(method="post", action=action, **attributes)(csrf_field(viewer), *children)


def button_form(viewer: Viewer, action: str, label: str, kind: str = "") -> Tag:
    """A form that is one button (follow, delete, log out)."""
    return post_form(
        viewer, action, tags.button(label, type="submit", class_=kind), class_="inline"
    )


def field(
    label: str,
    name: str,
    *,
    value: str = "",
    kind: str = "text",
    required: bool = True,
    hint: str = "",
    **attributes: str,
) -> Tag:
    """A labelled input."""
    field_id = f"field-{name}"
    extra = dict(attributes)
    if required:
        extra["required"] = "required"
    if hint:
        extra["aria-describedby"] = f"{field_id}-hint"
    control = tags.input(type=kind, name=name, id=field_id, value=value, **extra)
    return tags.div(class_="field")(
        tags.label(label, for_=field_id),
        control,
        tags.p(hint, id=f"{field_id}-hint", class_="hint") if hint else "",
    )


def text_area(label: str, name: str, *, value: str = "", max_length: int, rows: str = "4") -> Tag:
    field_id = f"field-{name}"
    return tags.div(class_="field")(
        tags.label(label, for_=field_id),
        tags.textarea(value, name=name, id=field_id, rows=rows, maxlength=str(max_length)),
    )


def problem(message: str | None) -> Tag | str:
    """The error box of a form that was refused, read out by screen readers."""
    if not message:
        return ""
    return tags.p(message, class_="problem", role="alert")


def navigation(viewer: Viewer) -> Tag:
    brand = tags.a("snet", href=url("/"), class_="brand")
    if viewer.user is None and viewer.session:
        return tags.nav(**{"aria-label": "Main"})(
            brand,
            tags.ul(
                tags.li(tags.a("Feed", href=url("/feed"))),
                tags.li(tags.a("Search", href=url("/search"))),
                tags.li(tags.a("Friends", href=url("/friends"))),
                tags.li(tags.a("Dialogs", href=url("/dialogs"))),
            ),
        )
    if viewer.user is None:
        return tags.nav(**{"aria-label": "Main"})(
            brand,
            tags.ul(
                tags.li(tags.a("Log in", href=url("/login"))),
                tags.li(tags.a("Sign up", href=url("/signup"))),
            ),
        )
    count = viewer.unread or 0
    badge = tags.span(
        str(count) if count else "",
        class_="badge" + ("" if count else " empty"),
        **{"data-unread-total": "", "aria-label": f"{count} unread"},
    )
    return tags.nav(**{"aria-label": "Main"})(
        brand,
        tags.ul(
            tags.li(tags.a("Feed", href=url("/feed"))),
            tags.li(tags.a("Search", href=url("/search"))),
            tags.li(tags.a("Friends", href=url("/friends"))),
            tags.li(tags.a("Dialogs ", badge, href=url("/dialogs"))),
            tags.li(tags.a("Profile", href=url(f"/users/{viewer.user.id}"))),
            tags.li(button_form(viewer, url("/logout"), "Log out", "link")),
        ),
    )


def html_document(viewer: Viewer, title: str, *content: Any) -> bytes:
    """The page *title* with *content* in the common layout, as UTF-8 HTML."""
    scripts: list[Tag] = []
    if viewer.user is not None:
        scripts.append(tags.script(src=url("/static/unread.js"), defer="defer"))
    document = tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} · snet"),
            tags.link(rel="stylesheet", href=url("/static/pages.css")),
            *scripts,
        ),
        tags.body(
            tags.a("Skip to content", href="#main", class_="skip"),
            tags.header(navigation(viewer)),
            Tag("main")(id="main")(tags.h1(title), *content),
            tags.footer(tags.p("snet: a small social network")),
        ),
    )
    return render_html(document)


def render_html(document: Tag) -> bytes:
    """*document* (an ``html`` tag with nothing to wait for) as an HTML5 document."""
    rendered: list[bytes] = []
    failed: list[Any] = []
    flattenString(None, document).addCallbacks(rendered.append, failed.append)
    if failed:
        failed[0].raiseException()
    return b"<!DOCTYPE html>\n" + rendered[0]


# --- pages ----------------------------------------------------------------------------------


def welcome_page(viewer: Viewer) -> bytes:
    return html_document(
        viewer,
        "Welcome to snet",
        tags.p("Follow your friends, read what they post, and talk to them in dialogs."),
        tags.p(
            tags.a("Sign up", href=url("/signup"), class_="button"),
            " or ",
            tags.a("log in", href=url("/login")),
            " if you have an account.",
        ),
    )


def signup_page(viewer: Viewer, values: Mapping[str, str], error: str | None = None) -> bytes:
    def value(name: str) -> str:
        return values.get(name, "")

    return html_document(
        viewer,
        "Sign up",
        problem(error),
        post_form(
            viewer,
            url("/signup"),
            field("First name", "first_name", value=value("first_name"), maxlength=str(MAX_NAME),
                  autocomplete="given-name"),
            field("Second name", "second_name", value=value("second_name"),
                  maxlength=str(MAX_NAME), autocomplete="family-name"),
            field("Birth date", "birthdate", value=value("birthdate"), kind="date",
                  hint="As YYYY-MM-DD if your browser asks for text."),
            field("City", "city", value=value("city"), required=False, maxlength=str(MAX_CITY)),
            text_area("About you", "biography", value=value("biography"),
                      max_length=MAX_BIOGRAPHY),
            field("Password", "password", kind="password", autocomplete="new-password",
                  minlength="8", hint="At least 8 characters."),
            tags.button("Sign up", type="submit"),
        ),
        tags.p("Already have an account? ", tags.a("Log in", href=url("/login")), "."),
    )  # fmt: skip


def login_page(
    viewer: Viewer, user_id: str = "", error: str | None = None, *, next_page: str | None = None
) -> bytes:
    return html_document(
        viewer,
        "Log in",
        problem(error),
        post_form(
            viewer,
            url("/login", next=next_page) if next_page else url("/login"),
            field("User id", "id", value=user_id, inputmode="numeric", autocomplete="username",
                  hint="The number you were given when you signed up."),
            field("Password", "password", kind="password", autocomplete="current-password"),
            tags.button("Log in", type="submit"),
        ),
        tags.p("New here? ", tags.a("Sign up", href=url("/signup")), "."),
    )  # fmt: skip


def _person_link(user: User) -> Tag:
    return tags.a(full_name(user), href=url(f"/users/{user.id}"))


def profile_page(viewer: Viewer, user: User, *, follows: bool, welcome: bool = False) -> bytes:
    assert viewer.user is not None
    own = user.id == viewer.user.id
    details = tags.dl(class_="profile")(
        tags.dt("User id"),
        tags.dd(str(user.id)),
        tags.dt("Born"),
        tags.dd(_day(user.profile.birthdate)),
        tags.dt("City"),
        tags.dd(user.profile.city or "—"),
        tags.dt("About"),
        tags.dd(user.profile.biography or "—", class_="text"),
    )
    actions: list[Any] = []
    if own:
        actions.append(
            tags.p(
                "This is your profile. ",
                tags.a("Write a post", href=url("/feed") + "#new-post"),
                " or ",
                tags.a("find people", href=url("/search")),
                ".",
            )
        )
    else:
        if follows:
            actions.append(button_form(viewer, url(f"/users/{user.id}/unfriend"), "Unfollow"))
        else:
            actions.append(button_form(viewer, url(f"/users/{user.id}/friend"), "Follow"))
        actions.append(tags.a("Write a message", href=url(f"/dialogs/{user.id}"), class_="button"))
    notice: Any = ""
    if welcome and own:
        notice = tags.p(
            "Welcome! Your user id is ",
            tags.strong(str(user.id)),
            ": you log in with it and your password.",
            class_="notice",
            role="status",
        )
    return html_document(
        viewer, full_name(user), notice, details, tags.div(class_="actions")(*actions)
    )


def _day(day: date) -> str:
    return day.strftime("%-d %B %Y")


def search_page(
    viewer: Viewer,
    first: str,
    second: str,
    results: Sequence[User] | None,
    error: str | None = None,
) -> bytes:
    found: Any = ""
    if results is not None:
        if results:
            found = tags.ul(class_="people")(
                *(tags.li(_person_link(u), " ", tags.span(u.profile.city, class_="muted"))
                  for u in results)
            )  # fmt: skip
        else:
            found = tags.p("Nobody has such a name.", class_="muted")
    return html_document(
        viewer,
        "Search people",
        problem(error),
        tags.form(method="get", action=url("/search"), class_="search")(
            field("First name starts with", "first_name", value=first, required=False),
            field("Second name starts with", "second_name", value=second, required=False),
            tags.button("Search", type="submit"),
        ),
        found,
    )


def friends_page(viewer: Viewer, friends: Sequence[User]) -> bytes:
    if not friends:
        listing: Any = tags.p(
            "You follow nobody yet. ", tags.a("Find people", href=url("/search")), "."
        )
    else:
        listing = tags.ul(class_="people")(
            *(
                tags.li(
                    _person_link(friend),
                    " ",
                    tags.a("Message", href=url(f"/dialogs/{friend.id}")),
                    " ",
                    button_form(viewer, url(f"/users/{friend.id}/unfriend"), "Unfollow", "link"),
                )
                for friend in friends
            )
        )
    return html_document(viewer, "People you follow", listing)


def _post_item(viewer: Viewer, post: Post, author: User | None) -> Tag:
    assert viewer.user is not None
    by = _person_link(author) if author is not None else f"user {post.author_id}"
    links: list[Any] = [tags.a("Link", href=url(f"/posts/{post.id}"))]
    if post.author_id == viewer.user.id:
        links.append(tags.a("Edit", href=url(f"/posts/{post.id}")))
    return tags.article(class_="post")(
        tags.p(by, class_="byline"),
        tags.p(post.text, class_="text"),
        tags.p(class_="post-links")(*links),
    )


def feed_page(
    viewer: Viewer,
    posts: Sequence[tuple[Post, User | None]],
    *,
    offset: int,
    limit: int,
    draft: str = "",
    error: str | None = None,
) -> bytes:
    paging: list[Any] = []
    if offset > 0:
        paging.append(tags.a("← Newer", href=url("/feed", offset=max(0, offset - limit))))
    if len(posts) == limit:
        paging.append(tags.a("Older →", href=url("/feed", offset=offset + limit)))
    listing: Any = (
        [_post_item(viewer, post, author) for post, author in posts]
        if posts
        else tags.p(
            "Nothing here yet: posts of the people you follow show here. ",
            tags.a("Find people", href=url("/search")),
            ".",
            class_="muted",
        )
    )
    return html_document(
        viewer,
        "Feed",
        tags.section(**{"aria-labelledby": "new-post"})(
            tags.h2("Write a post", id="new-post"),
            problem(error),
            post_form(
                viewer,
                url("/posts"),
                text_area("Your post", "text", value=draft, max_length=MAX_POST_TEXT),
                tags.button("Publish", type="submit"),
            ),
        ),
        tags.section(**{"aria-label": "Posts"})(listing),
        tags.nav(**{"aria-label": "Pages"}, class_="paging")(*paging),
    )


def post_page(
    viewer: Viewer, post: Post, author: User | None, error: str | None = None, draft: str = ""
) -> bytes:
    assert viewer.user is not None
    content: list[Any] = [_post_item(viewer, post, author)]
    if post.author_id == viewer.user.id:
        content += [
            tags.h2("Edit"),
            problem(error),
            post_form(
                viewer,
                url(f"/posts/{post.id}/edit"),
                text_area("Text", "text", value=draft or post.text, max_length=MAX_POST_TEXT),
                tags.button("Save", type="submit"),
            ),
            tags.h2("Delete"),
            button_form(viewer, url(f"/posts/{post.id}/delete"), "Delete this post", "danger"),
        ]
    return html_document(viewer, "Post", *content)


def dialogs_page(
    viewer: Viewer, people: Sequence[User], unread: Mapping[int, int], error: str | None = None
) -> bytes:
    rows = []
    for person in people:
        count = unread.get(person.id, 0)
        rows.append(
            tags.li(
                tags.a(full_name(person), href=url(f"/dialogs/{person.id}")),
                " ",
                tags.span(
                    str(count) if count else "",
                    class_="badge" + ("" if count else " empty"),
                    **{"data-unread-peer": str(person.id)},
                ),
            )
        )
    listing: Any = (
        tags.ul(class_="people")(*rows)
        if rows
        else tags.p(
            "No dialogs yet: open someone's profile and write them a message.", class_="muted"
        )
    )
    return html_document(
        viewer,
        "Dialogs",
        problem(error),
        tags.p("People who wrote to you, and the people you follow.", class_="muted"),
        listing,
    )


def dialog_page(
    viewer: Viewer,
    peer: User,
    messages: Sequence[Mapping[str, Any]],
    *,
    draft: str = "",
    error: str | None = None,
) -> bytes:
    assert viewer.user is not None
    me = viewer.user
    items = []
    for message in messages:
        mine = message.get("sender_id") == me.id
        when = str(message.get("created_at") or "")[:16].replace("T", " ")
        items.append(
            tags.li(class_="message " + ("mine" if mine else "theirs"))(
                tags.p(
                    tags.strong("You" if mine else full_name(peer)),
                    " ",
                    tags.time(when + " UTC", datetime=str(message.get("created_at") or "")),
                    class_="byline",
                ),
                tags.p(str(message.get("text", "")), class_="text"),
            )
        )
    listing: Any = (
        tags.ol(class_="messages")(*items)
        if items
        else tags.p("No messages yet. Say hello!", class_="muted")
    )
    return html_document(
        viewer,
        f"Dialog with {full_name(peer)}",
        listing,
        tags.span(id="latest"),
        problem(error),
        post_form(
            viewer,
            url(f"/dialogs/{peer.id}"),
            text_area("Message", "text", value=draft, max_length=MAX_MESSAGE_TEXT, rows="3"),
            tags.button("Send", type="submit"),
        ),
    )


def error_page(viewer: Viewer, status: int, message: str) -> bytes:
    titles = {
        400: "That did not work",
        401: "Please log in",
        403: "Not allowed",
        404: "Not found",
        405: "Not allowed",
        413: "Too large",
        429: "Too many attempts",
        503: "Try again shortly",
    }
    return html_document(
        viewer,
        titles.get(status, "Something went wrong"),
        tags.p(message, class_="problem", role="alert"),
        tags.p(tags.a("Back to the start", href=url("/"))),
    )
