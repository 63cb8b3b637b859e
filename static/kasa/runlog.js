// Live log of a run: replays stored lines, then streams new ones, progress and status.
// Reconnects with ?after=<last seq> so nothing is shown twice or lost.
(function () {
  "use strict";
  const box = document.getElementById("run-live");
  if (!box) return;
  const logEl = document.getElementById("run-log");
  const statusEl = document.getElementById("run-status");
  const bar = document.getElementById("run-progress");
  const barText = document.getElementById("run-progress-text");
  const connEl = document.getElementById("run-connection");
  const errEl = document.getElementById("run-error");
  const loadedActive = box.dataset.status === "pending" || box.dataset.status === "running";
  let lastSeq = 0;
  let finished = false;
  let retry = 500;

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

  // Keep the admin's read-only fields above the log in step with it.
  function setField(name, text) {
    const el = document.querySelector(".field-" + name + " .readonly");
    if (el) el.textContent = text || "-";
  }

  // A byte total estimated from the previous run may end short of it: a succeeded run is 100 %, no ETA.
  function completeBytes() {
    if (bar.max <= 10000) return;
    bar.value = bar.max;
    barText.textContent = barText.textContent.replace(/^\d+ %/, "100 %").replace(/, about \d+ s left$/, "");
  }

  function onMessage(ev) {
    const m = JSON.parse(ev.data);
    if (m.type === "line") {
      if (m.seq > lastSeq) appendLine(m);
    } else if (m.type === "progress") {
      if (m.total) {
        bar.max = m.total; bar.value = m.done;
        // Steps read as "3/5"; byte counts (a backup) as a percentage: the message carries MB, MB/s and the ETA.
        const count = m.total <= 10000 ? m.done + "/" + m.total : Math.floor(100 * m.done / m.total) + " %";
        barText.textContent = count + " " + (m.message || "");
        if (finished && box.dataset.status === "succeeded") completeBytes();
      }
      else { barText.textContent = m.message || ""; }
      setField("progress_message", m.message);
    } else if (m.type === "status") {
      statusEl.textContent = m.label;
      statusEl.className = "kasa-status kasa-status-" + m.status;
      box.dataset.status = m.status;
      errEl.hidden = !m.error;
      errEl.textContent = m.error || "";
      setField("status", m.label);
      setField("error", m.error);
      if (m.finished && !finished) {
        finished = true;
        if (m.status === "succeeded") {
          bar.value = bar.max;
          completeBytes();
        }
        connEl.textContent = m.duration != null ? "finished in " + m.duration.toFixed(1) + " s" : "finished";
        if (loadedActive) {  // timestamps and the result are on the server-rendered part: offer a reload
          const a = document.createElement("a");
          a.href = location.pathname;
          a.id = "run-reload";
          a.textContent = "show the result";
          connEl.append(" · ", a);
        }
      }
    }
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
