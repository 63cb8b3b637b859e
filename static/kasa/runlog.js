// Live run page: replays stored lines, then streams new ones and every field of the run (operations.runview):
// "status" (status, times, worker, error, result summary, links), "progress" (within the current phase),
// "phase" (named phase, overall percentage, ETA) and "steps" (an upgrade's step table, rendered by steps.html).
// Reconnects with ?after=<last seq> so nothing is shown twice or lost; never needs a reload.
(function () {
  "use strict";
  const box = document.getElementById("run-live");
  if (!box) return;
  const $ = (id) => document.getElementById(id);
  const logEl = $("run-log");
  const bar = $("run-progress");
  const barText = $("run-progress-text");
  const connEl = $("run-connection");
  const errEl = $("run-error");
  const etaEl = $("run-eta");
  let lastSeq = 0;
  let finished = false;
  let retry = 500;
  let phased = bar.dataset.phased === "1";
  let eta = null;  // seconds left at etaAt (ms), counted down between messages
  let etaAt = 0;

  function appendLine(m) {
    const span = document.createElement("span");
    span.className = "kasa-line kasa-" + m.level + " kasa-stream-" + m.stream;
    span.dataset.seq = m.seq;
    const ts = m.ts ? m.ts.substring(11, 19) + " " : "";
    span.textContent = ts + m.text + "\n";
    const atBottom = logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 20;
    logEl.appendChild(span);
    if (atBottom) logEl.scrollTop = logEl.scrollHeight;
    lastSeq = m.seq;
  }

  function setText(id, text) {
    const el = $(id);
    if (el) el.textContent = text || "—";
  }

  function humanDuration(s) {  // engines.humanize.human_duration, for the countdown only
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(Math.round(s) / 60), r = Math.round(s) % 60;
    if (m < 60) return m + " min " + String(r).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }

  function showEta() {
    if (finished || eta === null) { etaEl.textContent = ""; return; }
    const left = Math.max(0, eta - (Date.now() - etaAt) / 1000);
    etaEl.textContent = left < 1 ? "almost done" : "about " + humanDuration(left) + " left";
  }
  setInterval(showEta, 1000);

  function onStatus(m) {
    const st = $("run-status");
    st.textContent = m.label;
    st.className = "kasa-status kasa-status-" + m.status;
    st.dataset.status = m.status;
    box.dataset.status = m.status;
    errEl.hidden = !m.error;
    errEl.textContent = m.error || "";
    setText("run-started", m.started);
    setText("run-finished", m.finished_text);
    const took = $("run-took");
    if (took) took.textContent = m.duration_text ? " (took " + m.duration_text + ")" : "";
    setText("run-worker", m.worker);
    setText("run-summary", m.summary);
    const links = $("run-links");
    if (links) {
      links.replaceChildren();
      (m.links || []).forEach(function (l, i) {
        if (i) links.append(" · ");
        const a = document.createElement("a");
        a.href = l.url;
        a.textContent = l.label;
        links.append(a);
      });
      if (!links.childNodes.length) links.textContent = "—";
    }
    if (m.finished && !finished) {
      finished = true;
      if (m.status === "succeeded") { bar.value = bar.max; if (phased) barText.textContent = "100 %"; }
      showEta();
      connEl.textContent = m.duration_text ? "finished in " + m.duration_text : "finished";
    }
  }

  function onPhase(m) {
    phased = true;
    bar.max = 100;
    bar.value = m.percent;
    barText.textContent = Math.floor(m.percent) + " %";
    setText("run-phase", m.phase);
    $("run-phase-step").textContent = m.index >= 0 ? (m.index + 1) + " of " + m.phases.length : "";
    eta = m.eta; etaAt = Date.now();
    showEta();
  }

  function onProgress(m) {
    $("run-message").textContent = m.message || "";
    if (phased) return;  // the phase message carries the overall percentage
    if (m.total) {
      bar.max = m.total; bar.value = m.done;
      barText.textContent = m.total <= 10000 ? m.done + "/" + m.total : Math.floor(100 * m.done / m.total) + " %";
    }
  }

  function onMessage(ev) {
    const m = JSON.parse(ev.data);
    if (m.type === "line") { if (m.seq > lastSeq) appendLine(m); }
    else if (m.type === "progress") onProgress(m);
    else if (m.type === "phase") onPhase(m);
    else if (m.type === "status") onStatus(m);
    else if (m.type === "steps") document.dispatchEvent(new CustomEvent("kasa:steps", {detail: m}));
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(proto + location.host + box.dataset.wsPath + "?after=" + lastSeq);
    ws.onopen = function () { if (!finished) connEl.textContent = "live"; retry = 500; };
    ws.onmessage = onMessage;
    ws.onclose = function (ev) {
      // 4403: not staff of this customer's team (the server accepts, then closes with it).
      if (ev.code === 4403) { connEl.textContent = "not allowed"; return; }
      if (finished) { if (!/^finished/.test(connEl.textContent)) connEl.textContent = "finished"; return; }
      connEl.textContent = "reconnecting…";
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    };
  }
  connect();
})();
