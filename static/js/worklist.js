// Worklist: acknowledge / assign / resolve / snooze without a full page reload. Each action
// form is posted with fetch; the server answers the re-rendered row and the status counts.
// Without JavaScript the forms post and redirect as before.
(function () {
  "use strict";
  const table = document.getElementById("worklist-table");
  if (!table) return;
  const status = document.getElementById("worklist-status");

  function say(text, ok) {
    status.textContent = "";
    const p = document.createElement("p");
    p.className = "card flash " + (ok ? "success" : "error");
    p.textContent = text;
    status.appendChild(p);
  }

  table.addEventListener("submit", function (evt) {
    const form = evt.target;
    if (!form.classList.contains("js-action")) return;
    evt.preventDefault();
    const row = form.closest("tr");
    row.setAttribute("aria-busy", "true");
    form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
    fetch(form.action, {
      method: "POST", credentials: "same-origin", body: new FormData(form),
      headers: { "X-Requested-With": "fetch", Accept: "application/json" },
    }).then(function (resp) {
      return resp.json();
    }).then(function (json) {
      const holder = document.createElement("tbody");
      holder.innerHTML = json.html.trim();
      const fresh = holder.querySelector("tr");
      row.replaceWith(fresh);
      Object.keys(json.counts).forEach(function (k) {
        const el = document.querySelector('[data-count="' + k + '"]');
        if (el) el.textContent = json.counts[k];
      });
      ["open", "acknowledged", "snoozed", "resolved"].forEach(function (k) {
        const el = document.querySelector('[data-count="' + k + '"]');
        if (el && !(k in json.counts)) el.textContent = "0";
      });
      say(json.message, json.ok);
      const focusable = fresh.querySelector("button, select, a");
      if (focusable) focusable.focus();
    }).catch(function () {
      row.removeAttribute("aria-busy");
      form.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
      say("The action could not be sent. Check the connection and try again.", false);
    });
  });
})();
