// Live rollout page (rollouts.consumers): each message carries the page's live part rendered by the server
// (the same template as the page itself) and the status; the controls are shown for the statuses that allow them.
// Evidence left open stays open; the bake countdown ticks between messages. Reconnects; never needs a reload.
(function () {
  "use strict";
  const box = document.getElementById("rollout-live");
  if (!box) return;
  const body = document.getElementById("rollout-body");
  const connEl = document.getElementById("rollout-connection");
  let retry = 500;

  function humanDuration(s) {  // engines.humanize.human_duration, for the countdown only
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(Math.round(s) / 60), r = Math.round(s) % 60;
    if (m < 60) return m + " min " + String(r).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }

  function countdown() {
    body.querySelectorAll(".kasa-rollout-bake[data-until]").forEach(function (el) {
      const left = Math.max(0, (Date.parse(el.dataset.until) - Date.now()) / 1000);
      el.textContent = left < 1 ? "bake ending" : humanDuration(left) + " left";
    });
  }
  setInterval(countdown, 1000);

  function showControls(status) {
    document.querySelectorAll("#rollout-controls form[data-when]").forEach(function (f) {
      f.hidden = f.dataset.when.split(" ").indexOf(status) < 0;
    });
  }

  function onMessage(ev) {
    const m = JSON.parse(ev.data);
    if (m.type !== "rollout") return;
    const open = Array.from(body.querySelectorAll("details[open]")).map(function (d) { return d.id; });
    body.innerHTML = m.html;  // rendered and escaped by the server's template
    open.forEach(function (id) { const d = id && document.getElementById(id); if (d) d.open = true; });
    box.dataset.status = m.status;
    showControls(m.status);
    countdown();
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(proto + location.host + box.dataset.wsPath);
    ws.onopen = function () { connEl.textContent = "live"; retry = 500; };
    ws.onmessage = onMessage;
    ws.onclose = function (ev) {
      if (ev.code === 4403) { connEl.textContent = "not allowed"; return; }
      if (ev.code === 1000) { connEl.textContent = "closed"; return; }  // the rollout is gone
      connEl.textContent = "reconnecting…";
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    };
  }
  countdown();
  connect();
})();
