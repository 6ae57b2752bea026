// VBQ review: ROIs drawn in SVG over the slice PNG; drag to move, click to place, keyboard to
// nudge; each change asks the server for the VBQ of the new ROIs (nothing saved) and "Save"
// stores a corrected result. No inline script: data come from a json_script block.
(function () {
  "use strict";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const dataEl = document.getElementById("viewer-data");
  if (!dataEl) return;
  const data = JSON.parse(dataEl.textContent);
  const svg = document.getElementById("viewer");
  const image = document.getElementById("viewer-image");
  const layer = document.getElementById("roi-layer");
  const csrf = document.getElementById("csrf").value;
  const rois = {};
  Object.keys(data.rois || {}).forEach(function (k) { rois[k] = Object.assign({}, data.rois[k]); });
  let slice = data.slice;
  // First zoom: ~560 px wide on a desktop, but never wider than the card the viewer sits in
  // (a 256-column slice at x2 is 512 px: on a 390 px phone the spine was cut off and the frame
  // scrolled sideways). The zoom buttons can still enlarge it; the frame then scrolls.
  const MIN_ZOOM = 0.25, MAX_ZOOM = 4;
  function fitZoom() {
    const card = document.getElementById("viewer-frame").parentElement;
    const style = window.getComputedStyle(card);
    const room = card.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const wanted = Math.max(1, Math.round((560 / data.cols) * 2) / 2);
    const fits = room > 0 ? Math.floor((room / data.cols) * 4) / 4 : wanted;
    return Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, wanted, fits));
  }
  let zoom = fitZoom();
  let dirty = false;
  let previewSeq = 0;
  const spacing = data.spacing_mm || [1, 1];
  const DEFAULT_MM = { body: [7, 11], csf: [7, 3.5] }; // half height, half width (mm)

  function fmt(v) { return v === null || v === undefined ? "—" : Number(v).toFixed(2); }

  function imageUrl() {
    const wc = document.getElementById("wc").value;
    const ww = document.getElementById("ww").value;
    return data.image_url + "?slice=" + slice + "&wc=" + wc + "&ww=" + ww;
  }
  function refreshImage() { image.setAttribute("href", imageUrl()); }

  function draw() {
    while (layer.firstChild) layer.removeChild(layer.firstChild);
    Object.keys(rois).sort().forEach(function (level) {
      const r = rois[level];
      const g = document.createElementNS(SVG_NS, "g");
      g.setAttribute("class", "roi" + (level === "csf" ? " roi-csf" : "") +
        (r.slice_index !== slice ? " roi-other-slice" : ""));
      g.setAttribute("tabindex", "0");
      g.setAttribute("role", "button");
      g.setAttribute("aria-label", level + " ROI at row " + Math.round(r.row) + ", column " +
        Math.round(r.col) + ", slice " + r.slice_index + "; drag or use the arrow keys to move");
      g.dataset.level = level;
      const e = document.createElementNS(SVG_NS, "ellipse");
      e.setAttribute("cx", r.col); e.setAttribute("cy", r.row);
      e.setAttribute("rx", r.half_width); e.setAttribute("ry", r.half_height);
      const t = document.createElementNS(SVG_NS, "text");
      // body labels to the left (anterior), the CSF label to the right: no overlap at L3
      if (level === "csf") { t.setAttribute("x", r.col + r.half_width + 3); }
      else { t.setAttribute("x", r.col - r.half_width - 3); t.setAttribute("text-anchor", "end"); }
      t.setAttribute("y", r.row + 3);
      t.textContent = level;
      g.appendChild(e); g.appendChild(t);
      layer.appendChild(g);
    });
  }

  function toImage(evt) {
    const pt = svg.createSVGPoint();
    pt.x = evt.clientX; pt.y = evt.clientY;
    const p = pt.matrixTransform(svg.getScreenCTM().inverse());
    return { row: Math.max(0, Math.min(data.rows - 1, p.y)),
             col: Math.max(0, Math.min(data.cols - 1, p.x)) };
  }

  function fractured() {
    return Array.from(document.querySelectorAll(".fractured-box:checked")).map(function (b) { return b.value; });
  }

  function changed() {
    dirty = true;
    draw();
    keepWork("");
    const save = document.getElementById("save-corrected");
    save.disabled = false;
    document.getElementById("save-state").textContent = "Unsaved changes.";
    preview();
  }

  // --- unsaved work survives an expired session (sessionStorage, this tab only) ---
  const WORK_KEY = "vbq-review-work-" + data.result_id;
  function keepWork(pending, decision) {
    try {
      sessionStorage.setItem(WORK_KEY, JSON.stringify({
        rois: rois, fractured: fractured(), note: document.getElementById("save-note").value,
        pending: pending || "", slice: slice, decision: decision || null, dirty: dirty }));
    } catch (e) { /* storage full or disabled: the work stays in this page only */ }
  }
  function dropWork() { try { sessionStorage.removeItem(WORK_KEY); } catch (e) { /* none */ } }

  function SessionExpired() { this.message = "session expired"; }
  function sessionExpired(pending, decision) {
    keepWork(pending, decision);
    const dialog = document.getElementById("session-expired");
    const link = document.getElementById("relogin-link");
    link.href = data.login_url + "?next=" + encodeURIComponent(window.location.pathname);
    if (dialog && typeof dialog.showModal === "function" && !dialog.open) dialog.showModal();
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf,
                 "Accept": "application/json" },
      body: JSON.stringify(body),
    }).then(function (resp) {
      const type = resp.headers.get("Content-Type") || "";
      // LoginRequiredMiddleware sends an expired session to the login page (a redirect the
      // fetch follows); a lost CSRF cookie answers 403 in HTML: both need a new login.
      if ((resp.redirected && resp.url.indexOf(data.login_url) !== -1) ||
          (!type.startsWith("application/json") && (resp.status === 403 || resp.status === 401 ||
                                                     resp.url.indexOf(data.login_url) !== -1))) {
        throw new SessionExpired();
      }
      return resp.json().then(function (json) { return { ok: resp.ok, json: json }; });
    });
  }

  function clearFigures() {
    ["vbq-excl", "vbq-all", "vbq-confidence"].forEach(function (id) {
      document.getElementById(id).textContent = "—";
    });
    document.getElementById("save-outcome").textContent = "";
  }

  function showOutcome(o) {
    const el = document.getElementById("save-outcome");
    if (!o) { el.textContent = ""; return; }
    el.className = "small" + (o.counts ? "" : " warn");
    el.textContent = o.counts
      ? "Saving accepts this result: the follow-up will use it (high VBQ " + o.threshold_label + ")."
      : "Saving sends this result to the needs-review queue (it moves no alert until accepted): " +
        o.reasons.join("; ") + ".";
  }

  function showMeasurement(m) {
    document.getElementById("vbq-excl").textContent = fmt(m.vbq_excluding_fractured);
    document.getElementById("vbq-all").textContent = fmt(m.vbq_all_levels);
    document.getElementById("vbq-confidence").textContent = fmt(m.confidence);
    showOutcome(m.on_save);
    document.querySelectorAll("#level-table tr").forEach(function (tr) {
      const lv = m.levels[tr.dataset.level];
      tr.querySelector(".si").textContent = lv ? Math.round(lv.median_si) : "—";
      tr.querySelector(".px").textContent = lv ? lv.pixel_count : "—";
    });
    const list = document.getElementById("qc-list");
    while (list.firstChild) list.removeChild(list.firstChild);
    (m.qc_flags.length ? m.qc_flags : [{ code: "", message: "No QC flags.", severity: "none" }])
      .forEach(function (f) {
        const li = document.createElement("li");
        li.className = "sev-" + f.severity;
        if (f.code) { const s = document.createElement("strong"); s.textContent = f.code + ": "; li.appendChild(s); }
        li.appendChild(document.createTextNode(f.message));
        list.appendChild(li);
      });
  }

  function preview() {
    if (!rois.csf) {
      document.getElementById("vbq-state").textContent = "Place the CSF ROI (at L3) to compute the VBQ.";
      return;
    }
    const seq = ++previewSeq;
    const state = document.getElementById("vbq-state");
    state.textContent = "Recomputing…";
    // the stored figures no longer describe the moved ROIs: never leave them beside them
    clearFigures();
    post(data.preview_url, { rois: rois, fractured_levels: fractured() }).then(function (res) {
      if (seq !== previewSeq) return; // a newer change is on its way
      if (!res.ok) { state.textContent = res.json.error || "The VBQ could not be computed."; return; }
      showMeasurement(res.json);
      state.textContent = "Recomputed from your ROIs (not saved).";
      state.dataset.vbq = res.json.vbq_excluding_fractured === null ? "" : String(res.json.vbq_excluding_fractured);
    }).catch(function (err) {
      if (seq !== previewSeq) return;
      if (err instanceof SessionExpired) {
        state.textContent = "Your session has expired: log in again, your ROIs are kept.";
        sessionExpired("preview");
      } else { state.textContent = "Network error: try again."; }
    });
  }

  // --- drag, click-to-place ---
  let drag = null;
  svg.addEventListener("pointerdown", function (evt) {
    const g = evt.target.closest ? evt.target.closest(".roi") : null;
    if (!g) return;
    const p = toImage(evt);
    const r = rois[g.dataset.level];
    drag = { level: g.dataset.level, dr: p.row - r.row, dc: p.col - r.col, moved: false };
    svg.setPointerCapture(evt.pointerId);
    evt.preventDefault();
  });
  svg.addEventListener("pointermove", function (evt) {
    if (!drag) return;
    const p = toImage(evt);
    const r = rois[drag.level];
    r.row = p.row - drag.dr; r.col = p.col - drag.dc; r.slice_index = slice;
    drag.moved = true;
    draw();
  });
  function endDrag(evt) {
    if (!drag) return;
    const moved = drag.moved;
    drag = null;
    try { svg.releasePointerCapture(evt.pointerId); } catch (e) { /* already released */ }
    if (moved) changed();
    svg.dataset.justDragged = moved ? "1" : "";
  }
  svg.addEventListener("pointerup", endDrag);
  svg.addEventListener("pointercancel", endDrag);
  svg.addEventListener("click", function (evt) {
    if (svg.dataset.justDragged === "1") { svg.dataset.justDragged = ""; return; }
    if (evt.target.closest && evt.target.closest(".roi")) return;
    const level = document.getElementById("place-level").value;
    const p = toImage(evt);
    const mm = level === "csf" ? DEFAULT_MM.csf : DEFAULT_MM.body;
    const old = rois[level];
    rois[level] = { slice_index: slice, row: p.row, col: p.col,
      half_height: old ? old.half_height : Math.max(3, mm[0] / spacing[0]),
      half_width: old ? old.half_width : Math.max(3, mm[1] / spacing[1]) };
    changed();
  });

  // --- keyboard: move / resize the focused ROI ---
  layer.addEventListener("keydown", function (evt) {
    const g = evt.target.closest(".roi");
    if (!g) return;
    const r = rois[g.dataset.level];
    const step = evt.shiftKey ? 5 : 1;
    const moves = { ArrowUp: [-step, 0], ArrowDown: [step, 0], ArrowLeft: [0, -step], ArrowRight: [0, step] };
    if (moves[evt.key]) { r.row += moves[evt.key][0]; r.col += moves[evt.key][1]; }
    else if (evt.key === "+" || evt.key === "=") { r.half_height += 1; r.half_width += 1; }
    else if (evt.key === "-") { r.half_height = Math.max(2, r.half_height - 1); r.half_width = Math.max(2, r.half_width - 1); }
    else return;
    evt.preventDefault();
    r.slice_index = slice;
    const level = g.dataset.level;
    changed();
    const again = layer.querySelector('.roi[data-level="' + level + '"]');
    if (again) again.focus();
  });

  // --- slice, window/level, zoom ---
  function setSlice(s) {
    slice = Math.max(data.slice_min, Math.min(data.slice_max, s));
    document.getElementById("slice-label").textContent = "slice " + slice;
    refreshImage(); draw();
  }
  document.getElementById("slice-prev").addEventListener("click", function () { setSlice(slice - 1); });
  document.getElementById("slice-next").addEventListener("click", function () { setSlice(slice + 1); });
  let wlTimer = null;
  ["wc", "ww"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", function () {
      clearTimeout(wlTimer); wlTimer = setTimeout(refreshImage, 120);
    });
  });
  function setZoom(z) {
    zoom = Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, z));
    svg.setAttribute("width", data.cols * zoom);
    svg.setAttribute("height", data.rows * zoom);
  }
  document.getElementById("zoom-in").addEventListener("click", function () { setZoom(zoom + 0.5); });
  document.getElementById("zoom-out").addEventListener("click", function () { setZoom(zoom - 0.5); });
  document.querySelectorAll(".fractured-box").forEach(function (b) {
    b.addEventListener("change", function () { if (Object.keys(rois).length) changed(); });
  });

  // --- save ---
  function save() {
    const button = document.getElementById("save-corrected");
    const state = document.getElementById("save-state");
    button.disabled = true;
    state.textContent = "Saving…";
    post(data.save_url, { rois: rois, fractured_levels: fractured(),
                          note: document.getElementById("save-note").value })
      .then(function (res) {
        if (!res.ok) { state.textContent = res.json.error || "Not saved."; button.disabled = false; return; }
        dirty = false;
        dropWork();
        state.textContent = "Saved as result " + res.json.id + ".";
        window.location.assign(res.json.url);
      }).catch(function (err) {
        button.disabled = false;
        if (err instanceof SessionExpired) {
          state.textContent = "Not saved yet: your session has expired. Log in again and the save completes.";
          sessionExpired("save");
        } else { state.textContent = "Network error: not saved."; }
      });
  }
  document.getElementById("save-corrected").addEventListener("click", save);
  window.addEventListener("pagehide", function () { dirty = false; });

  // --- work kept from before a new login (or a reload): restored, and an interrupted save
  // completes ---
  function restoreWork() {
    let kept = null;
    try { kept = JSON.parse(sessionStorage.getItem(WORK_KEY) || "null"); } catch (e) { kept = null; }
    if (kept && kept.pending === "decision" && kept.decision) {
      // an accept / reject / fractured-levels decision interrupted by the expired session
      dropWork();
      const form = document.querySelector('form.js-decision[action="' + kept.decision.action + '"]');
      if (form) {
        kept.decision.fields.forEach(function (f) {
          form.querySelectorAll('[name="' + f[0] + '"]').forEach(function (el) {
            if (el.type === "checkbox") { el.checked = f[1].indexOf(el.value) !== -1; }
            else { el.value = f[1][0] || ""; }
          });
        });
        decide(form);
        return true;
      }
    }
    if (!kept || !kept.dirty || !kept.rois || !Object.keys(kept.rois).length) return false;
    Object.keys(rois).forEach(function (k) { delete rois[k]; });
    Object.keys(kept.rois).forEach(function (k) { rois[k] = kept.rois[k]; });
    document.querySelectorAll(".fractured-box").forEach(function (b) {
      b.checked = (kept.fractured || []).indexOf(b.value) !== -1;
    });
    document.getElementById("save-note").value = kept.note || "";
    if (typeof kept.slice === "number") setSlice(kept.slice);
    dirty = true;
    draw();
    document.getElementById("save-corrected").disabled = false;
    document.getElementById("save-state").textContent = "Your unsaved ROIs were restored.";
    const notice = document.getElementById("restored-notice");
    notice.hidden = false;
    if (kept.pending === "save") { keepWork(""); save(); } else { preview(); }
    return true;
  }
  // Accept / reject / fractured levels: posted here so that an expired session keeps the
  // decision (and the ROI work) through a new login; otherwise the page follows the answer.
  function decide(form) {
    const body = new FormData(form);
    fetch(form.action, { method: "POST", body: body, credentials: "same-origin",
                         headers: { "Accept": "application/json" } })
      .then(function (resp) {
        if (resp.redirected && resp.url.indexOf(data.login_url) !== -1) {
          const fields = [];
          Array.from(new Set(Array.from(body.keys()))).forEach(function (k) {
            if (k !== "csrfmiddlewaretoken") fields.push([k, body.getAll(k)]);
          });
          form.querySelectorAll('input[type="checkbox"]').forEach(function (el) {
            if (!body.has(el.name)) fields.push([el.name, []]);
          });
          sessionExpired("decision", { action: form.getAttribute("action"), fields: fields });
          return;
        }
        return resp.json().then(function (json) { window.location.assign(json.url); });
      }).catch(function () { form.submit(); });
  }
  document.querySelectorAll("form.js-decision").forEach(function (form) {
    form.addEventListener("submit", function (evt) { evt.preventDefault(); decide(form); });
  });

  document.getElementById("discard-restored").addEventListener("click", function () {
    dropWork();
    window.location.reload();
  });

  setZoom(zoom);
  draw();
  if (!restoreWork() && !rois.csf) preview();
})();
