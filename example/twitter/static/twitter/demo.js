// The demo page: every entry is rendered with textContent, never as HTML.
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("scalepub-config").textContent);
  const feed = document.getElementById("feed");
  const MAX_ROWS = 200;
  // For the browser tests: what arrived, in order, and the status changes.
  const state = (window.scalepubDemo = { received: [], statuses: [], lost: [] });
  document.getElementById("transport").textContent = config.transport;

  function cell(cls, text) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    return span;
  }

  function show(entry) {
    const f = entry.fields || {};
    state.received.push({ node: entry.node, seq: entry.seq, id: entry.id, text: f.text });
    const li = document.createElement("li");
    li.append(cell("author", "@" + (f.author || "?")), cell("text", f.text || ""),
              cell("latency", Math.round(entry.latencyMs) + " ms"));
    feed.prepend(li);
    while (feed.childElementCount > MAX_ROWS) feed.lastElementChild.remove();
    document.getElementById("count").textContent = String(state.received.length);
  }

  window.scalepubClient = new ScalePub.PubSubClient({
    nodes: config.nodes,
    domain: config.domain,
    service: config.service,
    transport: config.transport,
    pubsub: config.pubsub,
    historyUrl: config.historyUrl,
    event_cb: show,
    status_cb: (status, detail) => {
      state.statuses.push(status);
      document.getElementById("status").textContent = status + (detail ? ": " + detail : "");
    },
    history_lost_cb: (node, from, to) => {
      state.lost.push({ node, from, to });
      document.getElementById("lost").textContent = "(history lost on " + node + ")";
    },
  });
})();
