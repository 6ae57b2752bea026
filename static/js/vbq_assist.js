// VBQ review, "Place ROIs from one click": once armed, the next click on the image (inside the
// body named in the select) asks the server to place L1–L4 and the CSF from it; the new
// result's review page opens. Kept apart from vbq_review.js: it only listens in the capture
// phase while armed, so the usual click-to-place and drag do not see that click.
(function () {
  "use strict";
  const card = document.getElementById("assist-card");
  const svg = document.getElementById("viewer");
  const image = document.getElementById("viewer-image");
  if (!card || !svg || !image) return;
  const arm = document.getElementById("assist-arm");
  const state = document.getElementById("assist-state");
  const csrf = document.getElementById("assist-csrf").value;
  let armed = false;
  let busy = false;

  function setArmed(on) {
    armed = on;
    arm.setAttribute("aria-pressed", on ? "true" : "false");
    svg.style.cursor = on ? "crosshair" : "";
    if (on) {
      state.textContent = "Click once inside " + document.getElementById("assist-level").value +
        " on the image.";
    }
  }

  function currentSlice() {
    const href = image.getAttribute("href") || "";
    const m = /[?&]slice=(\d+)/.exec(href);
    return m ? parseInt(m[1], 10) : 0;
  }

  function toImage(evt) {
    const pt = svg.createSVGPoint();
    pt.x = evt.clientX; pt.y = evt.clientY;
    const p = pt.matrixTransform(svg.getScreenCTM().inverse());
    return { row: p.y, col: p.x };
  }

  arm.addEventListener("click", function () { if (!busy) setArmed(!armed); });

  function swallow(evt) {
    if (!armed && !busy) return;
    evt.stopPropagation();
    evt.preventDefault();
  }
  svg.addEventListener("pointerdown", swallow, true);
  svg.addEventListener("pointerup", swallow, true);

  svg.addEventListener("click", function (evt) {
    if (!armed || busy) { if (busy) swallow(evt); return; }
    swallow(evt);
    const p = toImage(evt);
    const body = { level: document.getElementById("assist-level").value,
                   slice_index: currentSlice(), row: p.row, col: p.col };
    busy = true;
    setArmed(false);
    state.textContent = "Placing the ROIs from " + body.level + "…";
    fetch(card.dataset.assistUrl, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify(body),
    }).then(function (resp) {
      return resp.json().then(function (data) { return { ok: resp.ok, data: data }; });
    }).then(function (res) {
      if (res.ok) {
        state.textContent = "ROIs placed: opening result " + res.data.id + " for review.";
        window.location.assign(res.data.url);
        return;
      }
      busy = false;
      state.textContent = res.data.error || "The ROIs could not be placed.";
    }).catch(function () {
      busy = false;
      state.textContent = "The server did not answer: try again.";
    });
  }, true);
})();
