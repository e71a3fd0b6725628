// The rating page of `decorr study serve`: one comparison at a time from the JSON API
// (/api/<token>/next, /api/<token>/item/<position>, POST /api/<token>/answer).
// No framework, no inline code (the page's CSP is default-src 'self').
"use strict";

(function () {
  const SCALES = [
    { key: "alignment", name: "Alignment" },
    { key: "fidelity", name: "Fidelity" },
  ];
  const ANCHORS = { 1: "poor", 5: "excellent" };
  // Below this width an image is shown with square pixels (tiny test images), not blurred.
  const PIXELATED_BELOW = 128;

  const token = location.pathname.split("/").filter(Boolean).pop() || "";
  const api = "/api/" + encodeURIComponent(token);

  const el = (id) => document.getElementById(id);
  const ui = {
    loading: el("loading"),
    task: el("task"),
    finished: el("finished"),
    finishedText: el("finished-text"),
    instructions: el("instructions"),
    error: el("error"),
    pageError: el("page-error"),
    prompt: el("prompt"),
    images: el("images"),
    form: el("form"),
    back: el("back"),
    next: el("next"),
    hint: el("hint"),
    progress: el("progress"),
    progressText: el("progress-text"),
    progressBar: el("progress-bar"),
    reviewLast: el("review-last"),
    reviewFirst: el("review-first"),
  };

  let view = "loading"; // "task" | "finished" | "loading"
  let task = null; // the comparison shown (the API's JSON)
  let saved = {}; // "A-alignment" -> the value the server holds for the comparison shown
  let total = 0;
  let busy = false;
  // Choices made but not submitted, by position: kept while the page is open, so going Back
  // and returning does not lose them.
  const drafts = {};

  // ---- the API ------------------------------------------------------------------------------

  async function call(url, options) {
    let res;
    try {
      res = await fetch(url, Object.assign({ cache: "no-store", credentials: "same-origin" }, options));
    } catch (e) {
      throw new Error("Could not reach the server. Check your connection and try again; "
        + "the answers on this page are kept.");
    }
    let body = null;
    try {
      body = await res.json();
    } catch (e) {
      body = null;
    }
    if (!res.ok) {
      let msg;
      if (body && typeof body.error === "string") msg = body.error;
      else if (res.status === 404) msg = "This rating link is not valid (or the study was closed).";
      else msg = "The server answered with an error (" + res.status + ").";
      throw new Error(msg);
    }
    if (body === null) throw new Error("The server sent an answer this page cannot read.");
    return body;
  }

  // ---- showing a comparison -----------------------------------------------------------------

  function scaleId(slot, scale) {
    return slot + "-" + scale;
  }

  function make(tag, props, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k in e && k !== "for") e[k] = v;
      else e.setAttribute(k, v);
    }
    for (const c of children || []) e.append(c);
    return e;
  }

  function scaleFieldset(slot, scale) {
    const id = scaleId(slot, scale.key);
    const choices = make("div", { class: "choices" });
    for (let v = 1; v <= 5; v++) {
      const input = make("input", {
        type: "radio", name: id, id: id + "-" + v, value: String(v), class: "visually-hidden",
      });
      const label = make("label", { for: id + "-" + v }, [String(v)]);
      if (ANCHORS[v]) {
        label.title = v + " = " + ANCHORS[v];
        label.append(make("span", { class: "visually-hidden", text: " (" + ANCHORS[v] + ")" }));
      }
      choices.append(input, label);
    }
    const legend = make("legend", {}, [
      make("span", { class: "visually-hidden", text: "Image " + slot + ", " }),
      scale.name,
    ]);
    return make("fieldset", { class: "scale", "data-slot": slot, "data-scale": scale.key },
      [legend, make("div", { class: "scale-body" }, [choices])]);
  }

  function card(image) {
    const slot = image.slot;
    const img = make("img", {
      src: image.url, alt: "Image " + slot, width: 512, height: 512, decoding: "async",
    });
    img.addEventListener("load", () => {
      img.classList.toggle("pixelated", img.naturalWidth < PIXELATED_BELOW);
    });
    img.addEventListener("error", () => img.classList.add("broken"));
    const label = make("span", { class: "slot", id: "slot-" + slot }, [
      make("span", { class: "visually-hidden", text: "Image " }), slot,
    ]);
    return make("div", { class: "card", role: "group", "aria-labelledby": "slot-" + slot,
      "data-slot": slot }, [
      make("div", { class: "frame" }, [label, img]),
      ...SCALES.map((s) => scaleFieldset(slot, s)),
    ]);
  }

  function scales() {
    return Array.from(ui.images.querySelectorAll("fieldset.scale"));
  }

  function valueOf(fs) {
    const checked = fs.querySelector("input:checked");
    return checked ? Number(checked.value) : null;
  }

  function setValue(fs, v) {
    const input = fs.querySelector('input[value="' + v + '"]');
    if (input) input.checked = true;
  }

  function fieldsetFor(slot, scale) {
    return ui.images.querySelector('fieldset[data-slot="' + slot + '"][data-scale="' + scale + '"]');
  }

  function current() {
    const values = {};
    for (const fs of scales()) values[scaleId(fs.dataset.slot, fs.dataset.scale)] = valueOf(fs);
    return values;
  }

  function setProgress(done, tot, text) {
    total = tot;
    ui.progress.hidden = false;
    ui.progressText.textContent = text;
    ui.progressBar.max = Math.max(tot, 1);
    ui.progressBar.value = done;
    ui.progressBar.setAttribute("aria-valuetext", done + " of " + tot + " answered");
    ui.progressBar.title = done + " of " + tot + " answered";
  }

  function showOnly(section) {
    for (const s of [ui.loading, ui.task, ui.finished]) s.hidden = s !== section;
    ui.instructions.hidden = section === ui.finished;
  }

  function showTask(t) {
    view = "task";
    task = t;
    hideErrors();
    setProgress(t.done, t.total, "Comparison " + t.position + " of " + t.total);
    ui.prompt.textContent = t.prompt;
    ui.images.replaceChildren(...t.images.map(card));
    ui.images.dataset.count = String(t.images.length);
    saved = {};
    for (const r of t.ratings || []) {
      for (const s of SCALES) {
        saved[scaleId(r.slot, s.key)] = r[s.key];
        const fs = fieldsetFor(r.slot, s.key);
        if (fs) setValue(fs, r[s.key]);
      }
    }
    const draft = drafts[t.position];
    if (draft) {
      for (const fs of scales()) {
        const v = draft[scaleId(fs.dataset.slot, fs.dataset.scale)];
        if (v) setValue(fs, v);
      }
    }
    ui.back.disabled = t.position <= 1;
    showOnly(ui.task);
    document.title = "Image rating: " + t.position + " of " + t.total;
    refresh();
    window.scrollTo(0, 0);
    ui.prompt.focus({ preventScroll: true });
  }

  function showFinished(f) {
    view = "finished";
    task = null;
    hideErrors();
    setProgress(f.done, f.total, "All " + f.total + " comparisons answered");
    ui.finishedText.textContent = "You have rated all " + f.total + " comparisons. Your answers "
      + "are saved; you can close this page.";
    showOnly(ui.finished);
    document.title = "Image rating: thank you";
    window.scrollTo(0, 0);
    ui.finished.focus({ preventScroll: true });
  }

  function show(data) {
    if (data.finished) showFinished(data);
    else showTask(data);
  }

  // A message by the buttons while a comparison is shown, else on the page.
  function showError(msg) {
    const target = view === "task" ? ui.error : ui.pageError;
    target.textContent = msg;
    target.hidden = false;
    if (view === "loading") ui.loading.hidden = true;
  }

  function hideErrors() {
    ui.error.hidden = true;
    ui.pageError.hidden = true;
  }

  // The state of Next, the hint and the highlighted scale, after any change.
  function refresh() {
    if (view !== "task") return;
    const missing = scales().filter((fs) => valueOf(fs) === null).length;
    ui.next.disabled = busy || missing > 0;
    ui.back.disabled = busy || task.position <= 1;
    if (missing > 0) {
      ui.hint.textContent = missing === 1 ? "1 rating left" : missing + " ratings left";
    } else if (Object.keys(saved).length === 0) {
      ui.hint.textContent = "All rated: press Next (or Enter)";
    } else if (unchanged()) {
      ui.hint.textContent = "Answered before: change a rating to replace it, or go on with Next";
    } else {
      ui.hint.textContent = "Changed: Next saves the new ratings";
    }
    const cur = currentScale();
    for (const fs of scales()) fs.classList.toggle("current", fs === cur);
  }

  // Whether the ratings shown are those the server holds.
  function unchanged() {
    const values = current();
    return Object.keys(values).every((k) => saved[k] === values[k]);
  }

  // The scale that digit keys set: the focused one, else the first one not rated yet.
  function currentScale() {
    const a = document.activeElement;
    const focused = a && a.closest ? a.closest("fieldset.scale") : null;
    if (focused && ui.images.contains(focused)) return focused;
    return scales().find((fs) => valueOf(fs) === null) || null;
  }

  function focusScale(fs) {
    const input = fs.querySelector("input:checked") || fs.querySelector("input");
    input.focus();
  }

  // ---- moving ----------------------------------------------------------------------------

  async function load(url) {
    if (busy) return;
    busy = true;
    refresh();
    try {
      show(await call(url));
    } catch (e) {
      showError(e.message);
    } finally {
      busy = false;
      refresh();
    }
  }

  function loadPosition(p) {
    return load(api + "/item/" + p);
  }

  // After the comparison at `position`: the one after it, or (after the last) the first one
  // not answered yet, or the thank-you page.
  function forward(position) {
    if (position < total) return loadPosition(position + 1);
    return load(api + "/next");
  }

  async function submit() {
    if (busy || view !== "task") return;
    const values = current();
    const unset = scales().find((fs) => valueOf(fs) === null);
    if (unset) {
      ui.hint.textContent = "Rate every image on both scales first";
      focusScale(unset);
      return;
    }
    const position = task.position;
    if (unchanged()) {
      delete drafts[position];
      return forward(position);
    }
    const ratings = task.images.map((im) => ({
      slot: im.slot,
      alignment: values[scaleId(im.slot, "alignment")],
      fidelity: values[scaleId(im.slot, "fidelity")],
    }));
    busy = true;
    refresh();
    ui.hint.textContent = "Saving\u2026";
    let ok = false;
    try {
      const r = await call(api + "/answer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ item: task.item, ratings: ratings }),
      });
      delete drafts[position];
      setProgress(r.done, r.total, ui.progressText.textContent);
      ok = true;
    } catch (e) {
      showError("Your answer was not saved: " + e.message);
    } finally {
      busy = false;
      refresh();
    }
    if (ok) await forward(position);
  }

  function back() {
    if (busy) return;
    if (view === "finished") return loadPosition(total);
    if (view === "task" && task.position > 1) return loadPosition(task.position - 1);
  }

  // ---- events ----------------------------------------------------------------------------

  ui.images.addEventListener("change", () => {
    if (task) drafts[task.position] = current();
    hideErrors();
    refresh();
  });
  ui.images.addEventListener("focusin", refresh);
  ui.images.addEventListener("focusout", () => setTimeout(refresh, 0));
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  ui.back.addEventListener("click", back);
  ui.reviewLast.addEventListener("click", back);
  ui.reviewFirst.addEventListener("click", () => loadPosition(1));

  document.addEventListener("keydown", (e) => {
    // Held keys do not repeat: one key press, one rating (or one step back).
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing || e.repeat) return;
    const t = e.target;
    const native = t && t.closest && t.closest("button, a, summary, textarea, select, "
      + "input:not([type=radio])");
    if (e.key === "Backspace") {
      if (t && t.closest && t.closest("textarea, input:not([type=radio])")) return;
      e.preventDefault();
      back();
      return;
    }
    if (view !== "task") return;
    if (/^[1-5]$/.test(e.key) && !e.shiftKey) {
      const fs = currentScale();
      if (!fs || busy) return;
      e.preventDefault();
      setValue(fs, e.key);
      drafts[task.position] = current();
      hideErrors();
      const all = scales();
      const after = all[all.indexOf(fs) + 1] || all.find((s) => valueOf(s) === null);
      refresh();
      if (after) focusScale(after);
      else ui.next.focus();
      return;
    }
    if (e.key === "Enter" && !native) {
      e.preventDefault();
      submit();
    }
  });

  load(api + "/next");
})();
