// Job status page: poll the imaging jobs API every 5 s and update the table in place.
(function () {
  "use strict";
  const table = document.getElementById("jobs-table");
  if (!table) return;
  const tbody = table.querySelector("tbody");
  const stamp = document.getElementById("jobs-updated");
  const LABELS = { queued: "Queued", running: "Running", succeeded: "Succeeded",
                   needs_review: "Needs review", failed: "Failed" };

  function cell(cls, text) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (text !== undefined) td.textContent = text;
    return td;
  }
  function seconds(a, b) {
    if (!a) return "—";
    if (!b) return "running";
    const s = Math.max(0, (new Date(b) - new Date(a)) / 1000);
    return s < 90 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
  }
  function fill(tr, job) {
    const status = tr.querySelector(".c-status");
    status.textContent = "";
    const badge = document.createElement("span");
    badge.className = "badge status-" + job.status;
    badge.textContent = LABELS[job.status] || job.status;
    status.appendChild(badge);
    const v = job.vbq_excluding_fractured;
    tr.querySelector(".c-vbq").textContent = v === null ? "—" : Number(v).toFixed(2);
    tr.querySelector(".c-time").textContent = seconds(job.started_at, job.finished_at);
    tr.querySelector(".c-attempts").textContent = job.attempts;
    const err = tr.querySelector(".c-error");
    err.textContent = "";
    if (job.error_code) {
      const strong = document.createElement("strong");
      strong.textContent = job.error_code;
      err.appendChild(strong);
      err.appendChild(document.createTextNode(" " + (job.error_message || "").slice(0, 120)));
    } else {
      err.textContent = "—";
    }
  }
  function newRow(job) {
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    const first = cell("");
    if (table.dataset.reviewUrl) {
      const a = document.createElement("a");
      a.href = table.dataset.reviewUrl.replace(/0\/$/, job.id + "/");
      a.textContent = job.id;
      first.appendChild(a);
    } else { first.textContent = job.id; }
    const patient = cell("");
    const link = document.createElement("a");
    link.href = table.dataset.patientUrl.replace("00000000-0000-0000-0000-000000000000", job.patient_id);
    link.textContent = "open patient";
    patient.appendChild(link);
    tr.append(first, patient, cell("c-status"), cell("c-vbq"),
              cell("", new Date(job.queued_at).toISOString().slice(0, 19).replace("T", " ")),
              cell("c-time"), cell("c-attempts"), cell("c-error"));
    return tr;
  }
  function poll() {
    let url = table.dataset.api + "?limit=50";
    if (table.dataset.status) url += "&status=" + encodeURIComponent(table.dataset.status);
    fetch(url, { credentials: "same-origin",
                 headers: { Accept: "application/json", "X-Requested-With": "fetch" } })
      .then(function (r) {
        // The session ended (the jobs API, like all of DRF, answers 403 "not authenticated";
        // the login middleware 401): stop polling and offer the login.
        if (r.status === 401 || r.status === 403) {
          clearInterval(timer);
          stamp.textContent = "Your session has ended. ";
          const login = document.createElement("a");
          login.href = "/accounts/login/?next=" + encodeURIComponent(location.pathname +
                                                                     location.search);
          login.textContent = "Log in again";
          stamp.appendChild(login);
          return null;
        }
        if (!r.ok) throw new Error(r.status);
        return r.json();
      })
      .then(function (page) {
        if (!page) return;
        const empty = tbody.querySelector("td[colspan]");
        if (empty && page.results.length) empty.parentNode.remove();
        page.results.slice().reverse().forEach(function (job) {
          let tr = tbody.querySelector('tr[data-job="' + job.id + '"]');
          if (!tr) { tr = newRow(job); tbody.insertBefore(tr, tbody.firstChild); }
          fill(tr, job);
        });
        stamp.textContent = "Updated " + new Date().toLocaleTimeString();
      })
      .catch(function () { stamp.textContent = "Update failed; retrying."; });
  }
  const timer = setInterval(poll, 5000);
  poll();
})();
