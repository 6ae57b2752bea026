// DICOM zip upload with a progress bar (XHR upload progress), posting to the imaging API. The
// answer says what really happened: stored and queued for scoring, stored but not scored (and
// why: e.g. a nearer MRI is linked), or refused because the images are another patient's
// (a coordinator may then store them with a coded, audited reason).
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const bar = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const button = document.getElementById("upload-button");
  const override = document.getElementById("identity-override");

  function say(parts) {
    status.textContent = "";
    parts.forEach(function (p) {
      if (typeof p === "string") { status.appendChild(document.createTextNode(p)); return; }
      const a = document.createElement("a");
      a.href = p.href; a.textContent = p.text;
      status.appendChild(a);
    });
  }

  function outcomeText(json) {
    const studies = json.outcome || [];
    const jobs = studies.reduce(function (n, s) { return n + (s.jobs || 0); }, 0);
    const head = "Stored " + json.stored + " file(s)" +
      (json.rejected ? ", skipped " + json.rejected + " non-DICOM file(s)" : "") + ". ";
    if (jobs > 0) {
      return [head + "Scoring is queued (" + jobs + " job(s)): ",
              { href: form.dataset.jobsUrl, text: "follow it on the jobs page" }, "."];
    }
    const scored = studies.reduce(function (n, s) { return n + (s.scored || 0); }, 0);
    if (scored > 0) {
      return [head + "This study was scored before (" + scored + " result(s)); no new job was made."];
    }
    const why = studies.map(function (s) { return s.link_reason; }).filter(Boolean).join("; ");
    return [head + "No scoring job was made" + (why ? ": " + why : "") +
            ". The study is on the patient's timeline."];
  }

  function send(extra) {
    const input = document.getElementById("dicom-file");
    if (!input.files.length) { status.textContent = "Choose a zip file first."; return; }
    const body = new FormData();
    body.append("file", input.files[0]);
    Object.keys(extra || {}).forEach(function (k) { body.append(k, extra[k]); });
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("X-CSRFToken", form.querySelector("[name=csrfmiddlewaretoken]").value);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-Requested-With", "fetch");
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) {
        const pct = Math.round((e.loaded / e.total) * 100);
        bar.value = pct; bar.textContent = pct + "%";
        status.textContent = "Uploading… " + pct + "%";
      }
    });
    xhr.addEventListener("load", function () {
      button.disabled = false;
      // The session ended (the API answers 403 "not authenticated", the login middleware 401).
      if (xhr.status === 401 || (xhr.status === 403 && /credentials/.test(xhr.responseText))) {
        bar.value = 0;
        status.textContent = "Your session has ended, so nothing was uploaded. ";
        const login = document.createElement("a");
        login.href = "/accounts/login/?next=" + encodeURIComponent(location.pathname);
        login.textContent = "Log in again";
        status.appendChild(login);
        status.appendChild(document.createTextNode(", then choose the zip file again."));
        return;
      }
      let json = {};
      try { json = JSON.parse(xhr.responseText); } catch (e) { json = {}; }
      if (xhr.status === 201) {
        bar.value = 100;
        override.hidden = true;
        say(outcomeText(json));
      } else {
        bar.value = 0;
        status.textContent = "Upload refused (" + xhr.status + "): " + (json.detail || "unexpected answer");
        if (json.code === "patient-mismatch" && json.can_override) override.hidden = false;
      }
    });
    xhr.addEventListener("error", function () {
      button.disabled = false; status.textContent = "Network error: the upload did not finish.";
    });
    button.disabled = true;
    status.textContent = "Uploading…";
    xhr.send(body);
  }

  form.addEventListener("submit", function (evt) {
    evt.preventDefault();
    override.hidden = true;
    send({});
  });
  document.getElementById("override-button").addEventListener("click", function () {
    const reason = document.getElementById("override-reason").value;
    if (!reason) { status.textContent = "Choose why these images are this patient's."; return; }
    send({ override_reason: reason });
  });
})();
