// Progressive enhancement only: every page works without it. Refreshes the element that
// names a fragment URL in data-refresh every 5 seconds (the overview), without a reload.
(function () {
  "use strict";
  var live = document.querySelector("[data-refresh]");
  if (!live || !window.fetch) {
    return;
  }
  var url = live.getAttribute("data-refresh");
  function refresh() {
    if (document.hidden) {
      return;
    }
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (res) {
        // A sign-in that ended sends the login page; leave the last view in place.
        if (!res.ok || res.redirected) {
          return null;
        }
        return res.text();
      })
      .then(function (html) {
        if (html !== null) {
          live.innerHTML = html;
          live.setAttribute("data-updated", new Date().toISOString());
        }
      })
      .catch(function () {});
  }
  window.setInterval(refresh, 5000);
})();
