// DICOM zip upload with a progress bar (XHR upload progress), posting to the imaging API.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const bar = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const button = document.getElementById("upload-button");
  form.addEventListener("submit", function (evt) {
    evt.preventDefault();
    const input = document.getElementById("dicom-file");
    if (!input.files.length) { status.textContent = "Choose a zip file first."; return; }
    const body = new FormData();
    body.append("file", input.files[0]);
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
        status.textContent = "Stored " + json.stored + " file(s)" +
          (json.rejected ? ", skipped " + json.rejected + " non-DICOM file(s)" : "") +
          ". Scoring is queued: ";
        const a = document.createElement("a");
        a.href = form.dataset.jobsUrl; a.textContent = "follow it on the jobs page";
        status.appendChild(a);
        status.appendChild(document.createTextNode("."));
      } else {
        bar.value = 0;
        status.textContent = "Upload refused (" + xhr.status + "): " + (json.detail || "unexpected answer");
      }
    });
    xhr.addEventListener("error", function () {
      button.disabled = false; status.textContent = "Network error: the upload did not finish.";
    });
    button.disabled = true;
    status.textContent = "Uploading…";
    xhr.send(body);
  });
})();
