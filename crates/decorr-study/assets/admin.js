// The admin page of `decorr study serve`: the methods, each rater's progress (refreshed every
// few seconds from /api/admin/<admin>/progress) and the CSV export.
"use strict";

(function () {
  const REFRESH_MS = 4000;
  const admin = location.pathname.split("/").filter(Boolean).pop() || "";
  const el = (id) => document.getElementById(id);

  el("export").href = "/admin/" + encodeURIComponent(admin) + "/export.csv";

  function cell(cls, children) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.append(...children);
    return td;
  }

  function copyButton(url, name) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "secondary";
    b.textContent = "Copy";
    b.setAttribute("aria-label", "Copy the link of " + name);
    b.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(url);
        b.textContent = "Copied";
      } catch (e) {
        // No clipboard (plain http on another host): select the link for Ctrl+C instead.
        const range = document.createRange();
        range.selectNodeContents(b.previousSibling);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        b.textContent = "Selected: press Ctrl+C";
      }
      setTimeout(() => { b.textContent = "Copy"; }, 2500);
    });
    return b;
  }

  function row(r) {
    const url = location.origin + r.link;
    const tr = document.createElement("tr");
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = r.name;
    const bar = document.createElement("progress");
    bar.max = Math.max(r.total, 1);
    bar.value = r.done;
    bar.setAttribute("aria-label", "Progress of " + r.name);
    const pct = r.total > 0 ? Math.round((100 * r.done) / r.total) : 0;
    const text = document.createElement("span");
    text.textContent = r.done + " / " + r.total + " (" + pct + "%)";
    const progress = cell("progress-cell" + (r.total > 0 && r.done >= r.total ? " complete" : ""),
      [bar, text]);
    const a = document.createElement("a");
    a.href = url;
    a.textContent = url;
    a.rel = "noreferrer";
    a.target = "_blank";
    const link = cell("link-cell", [a, copyButton(url, r.name)]);
    tr.append(name, progress, link);
    return tr;
  }

  let timer = null;
  let last = "";

  async function refresh() {
    try {
      const res = await fetch("/api/admin/" + encodeURIComponent(admin) + "/progress",
        { cache: "no-store" });
      if (!res.ok) throw new Error("the server answered " + res.status);
      const body = await res.text();
      const p = JSON.parse(body);
      if (body !== last) render(p);
      last = body;
      el("updated").textContent = "Updated " + new Date().toLocaleTimeString()
        + " (refreshes every " + REFRESH_MS / 1000 + " s)";
      el("error").hidden = true;
    } catch (e) {
      el("error").textContent = "Could not refresh the progress: " + e.message
        + ". Is the server still running?";
      el("error").hidden = false;
    } finally {
      clearTimeout(timer);
      timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  // Redrawn only when something changed (a redraw would drop a selection in the table).
  function render(p) {
    const methods = el("methods");
    methods.replaceChildren(...p.methods.map((m) => {
      const li = document.createElement("li");
      li.textContent = m;
      return li;
    }));
    el("raters").replaceChildren(...p.raters.map(row));
    const done = p.raters.reduce((s, r) => s + r.done, 0);
    const total = p.raters.reduce((s, r) => s + r.total, 0);
    const finished = p.raters.filter((r) => r.total > 0 && r.done >= r.total).length;
    el("overall").textContent = done + " / " + total + " answered; " + finished + " of "
      + p.raters.length + " raters finished";
    el("overall-bar").max = Math.max(total, 1);
    el("overall-bar").value = done;
  }

  refresh();
})();
