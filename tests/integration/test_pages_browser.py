"""The web pages in a real browser: Debian's Chromium, headless, driven by Selenium through
Debian's chromedriver, against a real monolith process and a real chat instance.

Two people sign up, find and follow each other, post, see the post in the feed, exchange
messages and see the unread count change without a reload; a form posted without its CSRF
token is refused; text with ``<script>`` shows escaped; logging out revokes the token.

Screenshots of every page go to the directory named by ``SNET_SCREENSHOTS`` when it is set:
``SNET_SCREENSHOTS=docs/screenshots .venv/bin/pytest -m browser`` regenerates them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snet.testing.monolith_stack import monolith_with_one_chat
from snet.testing.servers import ConsulAgent, MariaDB, Redis

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the tests deps install it
    webdriver = None

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(
        webdriver is None or not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="browser tests need selenium and Debian's chromium and chromium-driver "
        "(scripts/install-deps installs them)",
    ),
]

WAIT = 15.0
"""Seconds a browser waits for something that the page shows by itself (the unread count)."""

SCREENSHOTS = os.environ.get("SNET_SCREENSHOTS")


@pytest.fixture(scope="module")
def site(consul_agent: ConsulAgent, mariadb: MariaDB, redis_server: Redis) -> Iterator[str]:
    with monolith_with_one_chat(
        consul_agent, mariadb, redis_server, name="pages", chat_redis_db=12, server_redis_db=13
    ) as (base, _fleet):
        yield base


class Browser:
    """One person's headless Chromium, with a profile of its own."""

    def __init__(self, base: str, name: str, width: int = 1000, height: int = 900) -> None:
        self.base = base
        self.name = name
        self.profile = tempfile.mkdtemp(prefix=f"snet-chromium-{name}-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--force-device-scale-factor=1",
            f"--window-size={width},{height}",
            f"--user-data-dir={self.profile}",
        ):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def fill(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            element = self.driver.find_element(By.NAME, name)
            if element.get_attribute("type") == "date":
                # A date input takes what the keyboard would type; set its value directly.
                self.driver.execute_script("arguments[0].value = arguments[1]", element, value)
            else:
                element.clear()
                element.send_keys(value)

    def press(self, label: str, where: str = "main") -> None:
        """Press button *label* and wait for the next page."""
        self._navigate(f"//{where}//button[normalize-space()='{label}']")

    def click_link(self, text: str) -> None:
        """Follow link *text* and wait for the next page."""
        self._navigate(f"//main//a[normalize-space()='{text}']")

    def _navigate(self, xpath: str) -> None:
        page = self.driver.find_element(By.TAG_NAME, "html")
        self.driver.find_element(By.XPATH, xpath).click()
        # While the old document goes, chromedriver may answer a look at its element with a
        # generic error ("Node ... does not belong to the document") instead of a stale
        # element: ask again.
        WebDriverWait(self.driver, WAIT, ignored_exceptions=[WebDriverException]).until(
            staleness_of(page), f"{xpath} led nowhere"
        )

    @property
    def heading(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "h1").text)

    @property
    def main_text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "main").text)

    @property
    def path(self) -> str:
        url = str(self.driver.current_url)
        return url.removeprefix(self.base)

    def total_badge(self) -> str:
        badge = self.driver.find_element(By.CSS_SELECTOR, "[data-unread-total]")
        return str(badge.text)

    def wait_for(self, condition: Any, message: str) -> None:
        WebDriverWait(self.driver, WAIT, poll_frequency=0.2).until(
            lambda _driver: condition(), message
        )

    def screenshot(self, name: str) -> None:
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            # The window as tall as the page (its body's bottom), plus the window's frame.
            height = self.driver.execute_script(
                "return document.body.getBoundingClientRect().bottom + window.scrollY + 16"
                " + window.outerHeight - window.innerHeight"
            )
            width = self.driver.get_window_size()["width"]
            self.driver.set_window_size(width, max(400, min(int(height), 1800)))
            self.driver.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))

    def session_cookie(self) -> str:
        cookie = self.driver.get_cookie("snet_session")
        assert cookie is not None
        return str(cookie["value"])


@pytest.fixture
def browsers(site: str) -> Iterator[tuple[Browser, Browser]]:
    alice = Browser(site, "alice")
    try:
        bob = Browser(site, "bob")
        try:
            yield alice, bob
        finally:
            bob.close()
    finally:
        alice.close()


def sign_up(browser: Browser, first: str, second: str, *, shot: str | None = None) -> int:
    """Sign *browser*'s person up; the id the welcome notice gives."""
    browser.open("/web/signup")
    assert browser.heading == "Sign up"
    browser.fill(
        {
            "first_name": first,
            "second_name": second,
            "birthdate": "1990-05-17",
            "city": "Lisbon",
            "biography": f"I am {first}. <b>bold?</b>",
            "password": "correct horse battery",
        }
    )
    if shot:
        browser.screenshot(shot)
    browser.press("Sign up")
    assert browser.heading == f"{first} {second}", browser.main_text
    notice = browser.driver.find_element(By.CSS_SELECTOR, ".notice strong")
    return int(notice.text)


def post_form(base: str, path: str, fields: dict[str, str], cookie: str) -> tuple[int, str]:
    """POST a urlencoded form with the session *cookie* from outside the browser."""
    body = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in fields.items()).encode()
    request = urllib.request.Request(
        base + path,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"snet_session={cookie}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_two_people_befriend_post_and_talk(browsers: tuple[Browser, Browser], site: str) -> None:
    """The whole walk of two people through the pages, in two real browsers."""
    alice, bob = browsers

    alice.open("/")
    assert alice.path == "/web/" and alice.heading == "Welcome to snet"
    alice.screenshot("welcome")
    alice_id = sign_up(alice, "Alice", "Liddell", shot="signup")
    alice.screenshot("own-profile")
    # What people write is shown as text, never as markup.
    assert "I am Alice. <b>bold?</b>" in alice.main_text
    bob_id = sign_up(bob, "Bob", "Builder")

    # Bob finds Alice by the start of her name and follows her.
    bob.open("/web/search")
    bob.fill({"first_name": "Ali", "second_name": "Lid"})
    bob.press("Search")
    bob.screenshot("search")
    bob.click_link("Alice Liddell")
    assert bob.heading == "Alice Liddell"
    bob.press("Follow")
    assert bob.driver.find_elements(By.XPATH, "//main//button[normalize-space()='Unfollow']")
    bob.screenshot("other-profile")
    bob.open("/web/friends")
    assert "Alice Liddell" in bob.main_text
    bob.screenshot("friends")

    # Alice posts, with markup in her text; it shows escaped, and runs nothing.
    alice.open("/web/feed")
    text = "Hello from Alice <script>document.title='owned'</script> & friends"
    alice.fill({"text": text})
    alice.press("Publish")
    assert alice.heading == "Post"
    assert text in alice.main_text
    assert "owned" not in alice.driver.title
    assert "&lt;script&gt;" in alice.driver.page_source
    alice.screenshot("post")

    # Bob sees it in his feed.
    bob.open("/web/feed")
    assert text in bob.main_text and "Alice Liddell" in bob.main_text
    bob.screenshot("feed")

    # Bob waits on his dialogs page; Alice writes to him; his count changes by itself.
    bob.open("/web/dialogs")
    assert bob.total_badge() == ""
    alice.open(f"/web/dialogs/{bob_id}")
    assert alice.heading == "Dialog with Bob Builder"
    alice.fill({"text": "Hi Bob! <i>not italic</i>"})
    alice.press("Send")
    assert alice.path.startswith(f"/web/dialogs/{bob_id}")
    assert "Hi Bob! <i>not italic</i>" in alice.main_text
    bob.wait_for(lambda: bob.total_badge() == "1", "Bob's unread count never showed 1")
    peer_badge = bob.driver.find_element(By.CSS_SELECTOR, f"[data-unread-peer='{alice_id}']")
    bob.wait_for(lambda: peer_badge.text == "1", "Alice's dialog never showed 1 unread")
    bob.screenshot("dialogs")

    # Bob reads it (which clears the count) and answers; Alice's count goes up.
    bob.click_link("Alice Liddell")
    assert "Hi Bob! <i>not italic</i>" in bob.main_text
    assert bob.total_badge() == ""
    bob.fill({"text": "Hello Alice, nice post."})
    bob.press("Send")
    bob.screenshot("dialog")
    alice.open("/web/feed")
    alice.wait_for(lambda: alice.total_badge() == "1", "Alice's unread count never showed 1")

    # A form posted without the CSRF token, or with another session's, is refused.
    status, page = post_form(site, "/web/posts", {"text": "forged"}, bob.session_cookie())
    assert status == 403 and "did not come from this site" in page
    forged = {"text": "forged", "csrf": "0" * 64}
    status, page = post_form(site, "/web/posts", forged, bob.session_cookie())
    assert status == 403
    page = bob.driver.find_element(By.TAG_NAME, "html")
    bob.driver.execute_script(
        "var f = document.createElement('form'); f.method = 'post';"
        "f.action = '/web/users/" + str(alice_id) + "/unfriend'; document.body.appendChild(f);"
        "f.submit();"
    )
    WebDriverWait(bob.driver, WAIT).until(staleness_of(page))
    assert bob.heading == "Not allowed"
    bob.screenshot("error")
    bob.open(f"/web/users/{alice_id}")
    assert bob.driver.find_elements(By.XPATH, "//main//button[normalize-space()='Unfollow']")

    # Logging out revokes the token: the cookie's token no longer works on the API.
    token = alice.session_cookie()
    alice.press("Log out", where="header")
    assert alice.heading == "Welcome to snet"
    request = urllib.request.Request(
        site + "/post/feed", headers={"Authorization": f"Bearer {token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    alice.open("/web/feed")
    assert alice.path.startswith("/web/login") and alice.heading == "Log in"

    # She logs in again with her id, and lands where she wanted to go.
    alice.fill({"id": str(alice_id), "password": "wrong password"})
    alice.press("Log in")
    assert "do not match" in alice.main_text
    alice.fill({"id": str(alice_id), "password": "correct horse battery"})
    alice.screenshot("login")
    alice.press("Log in")
    assert alice.path == "/web/feed" and alice.heading == "Feed"


def test_pages_fit_a_phone(site: str) -> None:
    """On a phone-sized screen the pages need no sideways scrolling."""
    phone = Browser(site, "phone", width=390, height=800)
    try:
        sign_up(phone, "Carol", "Phone")
        phone.open("/web/feed")
        overflow = phone.driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        phone.screenshot("phone-feed")
        unread = json.loads(
            phone.driver.execute_script(
                "var r = new XMLHttpRequest(); r.open('GET', '/web/unread.json', false);"
                "r.send(); return r.responseText;"
            )
        )
        assert unread == {"total": 0, "dialogs": {}}
    finally:
        phone.close()
