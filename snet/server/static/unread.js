// snet: keep the unread counts of the page up to date without a reload. Everything else
// on the pages works without JavaScript; this only polls /web/unread.json every few seconds
// and fills the badges marked data-unread-total and data-unread-peer="<user id>".
(function () {
  "use strict";
  var INTERVAL_MS = 3000;

  function show(badge, count) {
    badge.textContent = count > 0 ? String(count) : "";
    badge.classList.toggle("empty", !(count > 0));
    if (badge.hasAttribute("data-unread-total")) {
      badge.setAttribute("aria-label", count + " unread");
    }
  }

  function apply(counts) {
    document.querySelectorAll("[data-unread-total]").forEach(function (badge) {
      show(badge, counts.total || 0);
    });
    document.querySelectorAll("[data-unread-peer]").forEach(function (badge) {
      show(badge, counts.dialogs[badge.getAttribute("data-unread-peer")] || 0);
    });
  }

  function poll() {
    fetch("/web/unread.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (counts) { if (counts) { apply(counts); } })
      .catch(function () { /* offline for a moment: the next poll tries again */ })
      .finally(function () { window.setTimeout(poll, INTERVAL_MS); });
  }

  window.setTimeout(poll, INTERVAL_MS);
}());
