// Worklist: acknowledge / assign / resolve / snooze / note / undo resolve without a full page
// reload. Each action form is posted with fetch; the server answers the re-rendered row and
// the status counts. Without JavaScript the forms post and redirect as before.
//
// Resolve asks for a confirmation inside the row (the reason in words) before it is sent.
// A session that ended while the page was open (idle timeout) answers 401 (or a redirect to
// the login page, or a 403 that is not JSON: the CSRF check): the page then says so instead
// of "check the connection", keeps what was typed in the form (sessionStorage of this tab,
// cleared once put back), and offers to log in again; the login sends the browser back here, where the draft is put back in its
// form and sent (the server checks the alert's state as for any action).
(function () {
  "use strict";
  const table = document.getElementById("worklist-table");
  if (!table) return;
  table.classList.add("js");
  const status = document.getElementById("worklist-status");
  const DRAFT_KEY = "vbq-worklist-draft";

  function say(text, ok) {
    status.textContent = "";
    const p = document.createElement("p");
    p.className = "card flash " + (ok ? "success" : "error");
    p.textContent = text;
    status.appendChild(p);
  }

  function actionName(form) {
    const parts = new URL(form.action, location.href).pathname.split("/").filter(Boolean);
    return parts[parts.length - 1];
  }

  function sessionEnded(resp) {
    // 401: config.sessions answers a script whose session ended; a redirect to the login
    // page is the same news from a server without that middleware.
    if (resp.status === 401) return true;
    if (resp.redirected && new URL(resp.url).pathname.indexOf("/accounts/login/") === 0) {
      return true;
    }
    const type = resp.headers.get("Content-Type") || "";
    return resp.status === 403 && type.indexOf("application/json") === -1;
  }

  function keepDraft(form, row) {
    const fields = {};
    form.querySelectorAll("input[name], select[name], textarea[name]").forEach(function (el) {
      if (el.name === "csrfmiddlewaretoken") return;
      fields[el.name] = el.type === "checkbox" ? el.checked : el.value;
    });
    const draft = { alert: row.dataset.alert, action: actionName(form), fields: fields };
    try {
      sessionStorage.setItem(DRAFT_KEY, JSON.stringify(draft));
    } catch (e) { /* storage full or disabled: the dialog still explains */ }
  }

  function askToLogIn() {
    const dialog = document.getElementById("relogin-dialog");
    const link = document.getElementById("relogin-link");
    const back = location.pathname + location.search;
    link.href = link.getAttribute("href").split("?")[0] + "?next=" + encodeURIComponent(back);
    if (dialog && typeof dialog.showModal === "function") {
      dialog.showModal();
      link.focus();
    } else {
      say("Your session has ended. Log in again; what you typed is kept.", false);
    }
  }

  function restoreDraft() {
    let draft = null;
    try {
      draft = JSON.parse(sessionStorage.getItem(DRAFT_KEY) || "null");
      sessionStorage.removeItem(DRAFT_KEY);
    } catch (e) { return; }
    if (!draft) return;
    const row = table.querySelector('tr[data-alert="' + draft.alert + '"]');
    const form = row && Array.prototype.find.call(row.querySelectorAll("form.js-action"),
      function (f) { return actionName(f) === draft.action; });
    if (!form) {
      say("You were logged out before an action on alert " + draft.alert +
          " was sent; that alert is not on this page any more.", false);
      return;
    }
    Object.keys(draft.fields).forEach(function (name) {
      const el = form.elements.namedItem(name);
      if (!el) return;
      if (el.type === "checkbox") el.checked = draft.fields[name] === true;
      else if ("value" in el) el.value = draft.fields[name];
    });
    const details = form.closest("details");
    if (details) details.open = true;
    // The person had sent it (and confirmed a resolve): finish it now that they are logged
    // in again. The server checks the alert's state as for any action and says if it changed.
    send(form, "You were logged out before this was sent; it is sent now that you are " +
         "logged in again. ");
  }

  function reasonText(form) {
    const select = form.querySelector("select[name=reason]");
    return select && select.selectedIndex > 0 ? select.options[select.selectedIndex].text : "";
  }

  function confirmResolve(form) {
    const panel = form.querySelector(".confirm-panel");
    const text = reasonText(form);
    if (!text) {
      say("Choose why the alert is resolved first.", false);
      form.querySelector("select[name=reason]").focus();
      return;
    }
    panel.querySelector(".confirm-text").textContent = "Resolve as “" + text + "”?";
    panel.hidden = false;
    panel.querySelector(".confirm-yes").focus();
  }

  function send(form, prefix) {
    const row = form.closest("tr");
    row.setAttribute("aria-busy", "true");
    form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
    function release() {
      row.removeAttribute("aria-busy");
      form.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
    }
    fetch(form.action, {
      method: "POST", credentials: "same-origin", body: new FormData(form),
      headers: { "X-Requested-With": "fetch", Accept: "application/json" },
    }).then(function (resp) {
      if (sessionEnded(resp)) {
        release();
        keepDraft(form, row);
        askToLogIn();
        return null;
      }
      const type = resp.headers.get("Content-Type") || "";
      if (type.indexOf("application/json") === -1) {
        release();
        say("The server could not do this (HTTP " + resp.status + "). Try again; if it " +
            "keeps failing, tell the administrator.", false);
        return null;
      }
      return resp.json();
    }).then(function (json) {
      if (!json) return;
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
      say((prefix || "") + json.message, json.ok);
      const focusable = fresh.querySelector("button, select, a");
      if (focusable) focusable.focus();
    }).catch(function () {
      release();
      say("The action could not be sent: the server did not answer. Check the network " +
          "connection and try again.", false);
    });
  }

  table.addEventListener("submit", function (evt) {
    const form = evt.target;
    if (!form.classList.contains("js-action")) return;
    evt.preventDefault();
    if (form.classList.contains("resolve-form") && !form.elements.namedItem("confirmed").checked) {
      confirmResolve(form);
      return;
    }
    send(form);
  });

  table.addEventListener("click", function (evt) {
    const button = evt.target.closest("button");
    if (!button) return;
    const form = button.closest("form.resolve-form");
    if (!form) return;
    if (button.type === "submit") {
      // Before the browser's own check of the (hidden, for scripts) confirm box.
      evt.preventDefault();
      confirmResolve(form);
    } else if (button.classList.contains("confirm-yes")) {
      form.elements.namedItem("confirmed").checked = true;
      form.querySelector(".confirm-panel").hidden = true;
      send(form);
    } else if (button.classList.contains("confirm-no")) {
      form.querySelector(".confirm-panel").hidden = true;
      form.querySelector("button[type=submit]").focus();
    }
  });

  const close = document.getElementById("relogin-close");
  if (close) {
    close.addEventListener("click", function () {
      document.getElementById("relogin-dialog").close();
    });
  }
  restoreDraft();
})();
