"""The labelling page's HTML, CSS and JavaScript (served by nnforge.loop.label; nothing comes from another origin).

The script talks to /api/ only, puts every string from the store into the page with textContent, and runs the
actions one after another (a queue), so keys typed faster than the server answers are applied in order to the item
on screen when each runs.
"""

HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nnforge label</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/label.css">
<script src="/label.js" defer></script>
</head>
<body>
<header>
  <h1>nnforge label</h1>
  <span id="counter" aria-live="polite"></span>
  <label>show <select id="filter">
    <option value="new" selected>new</option>
    <option value="skipped">skipped</option>
    <option value="unclear">unclear</option>
    <option value="labelled">labelled</option>
  </select></label>
  <a id="export" href="/api/export" download="labels.csv">download labels.csv</a>
  <label class="import">import CSV <input type="file" id="import" accept=".csv,text/csv"></label>
</header>
<p id="message" role="status"></p>
<main id="main" hidden>
  <section id="input">
    <img id="image" alt="the captured image" hidden>
    <pre id="text" hidden></pre>
    <p id="position" class="small"></p>
    <p id="about" class="small"></p>
  </section>
  <section id="model">
    <h2>the model says</h2>
    <p id="prediction"></p>
    <p id="reason" class="small"></p>
    <table id="top"></table>
    <p id="current"></p>
  </section>
  <section id="labels">
    <h2>label</h2>
    <div id="buttons"></div>
    <div id="actions">
      <button type="button" id="accept">accept top guess <kbd>Enter</kbd></button>
      <button type="button" id="skip">skip <kbd>s</kbd></button>
      <button type="button" id="unclear">unclear <kbd>u</kbd></button>
      <button type="button" id="undo">undo <kbd>z</kbd></button>
      <button type="button" id="prev">previous <kbd>&larr;</kbd></button>
      <button type="button" id="next">next <kbd>&rarr;</kbd></button>
    </div>
  </section>
</main>
<p id="empty" hidden></p>
<footer class="small">keys: 1-9 and 0 the first ten classes, Enter the model's top guess, s skip, u unclear,
Backspace or z undo, &larr; &rarr; move between items</footer>
</body>
</html>
"""

CSS = """
:root { color-scheme: light dark; --accent: #2b6cb0; --muted: #718096; }
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 1rem 2rem; }
header { display: flex; flex-wrap: wrap; gap: 0.5rem 1.5rem; align-items: baseline; padding: 0.8rem 0;
         border-bottom: 1px solid #8884; }
h1 { font-size: 1.2rem; margin: 0; }
h2 { font-size: 0.9rem; text-transform: uppercase; letter-spacing: 0.05em; color: var(--muted); margin: 0 0 0.5rem; }
#counter { font-variant-numeric: tabular-nums; }
#message { min-height: 1.4em; margin: 0.5rem 0; }
#message.bad { color: #c53030; font-weight: 600; }
main { display: grid; grid-template-columns: minmax(260px, 1.2fr) 1fr; gap: 1.5rem; }
#labels { grid-column: 1 / -1; }
#image { width: 100%; max-width: 420px; max-height: 60vh; object-fit: contain; image-rendering: pixelated;
         background: #8882; border: 1px solid #8884; }
#text { white-space: pre-wrap; word-break: break-word; font: inherit; font-size: 1.1rem; padding: 0.8rem;
        border: 1px solid #8884; background: #8881; max-height: 60vh; overflow: auto; margin: 0; }
.small { font-size: 0.85rem; color: var(--muted); }
#prediction { font-size: 1.3rem; font-weight: 600; margin: 0 0 0.3rem; }
#top td { padding: 0.1rem 0.5rem 0.1rem 0; }
#top meter { width: 10rem; }
#top td.p { text-align: right; font-variant-numeric: tabular-nums; }
#buttons, #actions { display: flex; flex-wrap: wrap; gap: 0.4rem; margin-bottom: 0.6rem; }
button { font: inherit; padding: 0.4rem 0.8rem; border-radius: 6px; border: 1px solid #8886; cursor: pointer;
         background: #8881; color: inherit; }
button:hover { border-color: var(--accent); }
button.current { background: var(--accent); color: white; border-color: var(--accent); }
button.guess { border-color: var(--accent); border-width: 2px; }
kbd { font: 0.8em ui-monospace, monospace; padding: 0 0.3em; border: 1px solid #8886; border-radius: 3px; }
#empty { font-size: 1.1rem; padding: 2rem 0; }
footer { margin-top: 2rem; }
@media (max-width: 700px) { main { grid-template-columns: 1fr; } }
"""

JS = r"""
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "nnforge-label-token";
  const query = new URLSearchParams(location.search);
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = query.get("token") || hash.get("token") || sessionStorage.getItem(KEY) || "";
  if (query.has("token") || hash.has("token")) {
    sessionStorage.setItem(KEY, token);
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar and the history
  }

  const S = {classes: [], ids: [], pos: 0, item: null, done: [], filter: "new", imageUrl: null};
  let chain = Promise.resolve();
  const queue = (job) => { chain = chain.then(job).catch(fail); return chain; };

  function say(text, bad = false) {
    const m = $("message");
    m.textContent = text;
    m.className = bad ? "bad" : "";
  }
  function fail(err) { say((err && err.message) || String(err), true); }
  const pct = (p) => (100 * p).toFixed(1) + "%";

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", "Bearer " + token);
    const r = await fetch(path, {...options, headers});
    if (!r.ok) {
      let detail = r.status + " " + r.statusText;
      try {
        const body = await r.json();
        if (body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (_) { /* not JSON: the status line says it */ }
      throw new Error(detail);
    }
    return r;
  }
  const getJSON = async (path) => (await api(path)).json();
  const postJSON = async (path, body) => (await api(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})).json();

  function showCounts(c) {
    $("counter").textContent =
      `labelled ${c.labelled} · skipped ${c.skipped} · unclear ${c.unclear} · left ${c.new}`;
  }

  function buildButtons() {
    const box = $("buttons");
    box.replaceChildren();
    S.classes.forEach((name, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.label = name;
      if (i < 10) {
        const k = document.createElement("kbd");
        k.textContent = String((i + 1) % 10);
        b.append(k, " ");
      }
      b.append(name);
      b.addEventListener("click", () => { b.blur(); queue(() => act(name, "labelled")); });
      box.append(b);
    });
  }

  async function loadList() {
    const data = await getJSON("/api/items?limit=1000&status=" + encodeURIComponent(S.filter));
    if (JSON.stringify(data.classes) !== JSON.stringify(S.classes)) {
      S.classes = data.classes;
      buildButtons();
    }
    S.ids = data.items.map((it) => it.id);
    S.pos = 0;
    showCounts(data.counts);
    await show();
  }

  async function show() {
    if (!S.ids.length) {
      S.item = null;
      $("main").hidden = true;
      $("empty").hidden = false;
      $("empty").textContent = S.filter === "new"
        ? "Nothing left to label: every captured item has been looked at."
        : `No ${S.filter} items.`;
      document.body.dataset.shown = "none";
      return;
    }
    S.pos = Math.max(0, Math.min(S.pos, S.ids.length - 1));
    const item = await getJSON("/api/item/" + S.ids[S.pos]);
    await render(item);
    S.item = item;
    document.body.dataset.shown = String(item.id);
  }

  async function render(item) {
    const img = $("image"), text = $("text");
    if (item.kind === "text") {
      img.hidden = true;
      img.removeAttribute("src");
      text.textContent = item.text;
      text.hidden = false;
    } else {
      text.hidden = true;
      text.textContent = "";
      // fetched rather than pointed at, so that the bearer token goes with it when the server has one
      const blob = await (await api(item.content)).blob();
      const old = S.imageUrl;
      S.imageUrl = URL.createObjectURL(blob);
      await new Promise((resolve) => {
        img.onload = resolve;
        img.onerror = () => { say(`this browser cannot show the image (${blob.type})`, true); resolve(); };
        img.src = S.imageUrl;
      });
      if (old) URL.revokeObjectURL(old);
      img.hidden = false;
    }
    $("position").textContent = `item ${S.pos + 1} of ${S.ids.length} ${S.filter} · #${item.id}` +
      (item.name ? ` · ${item.name}` : "");
    const when = new Date(item.at * 1000).toLocaleString();
    $("about").textContent = `captured ${when}` + (item.model ? ` from ${item.model}` : "") +
      (item.version ? ` version ${item.version}` : "");
    $("prediction").textContent = `${item.prediction} (${pct(item.confidence)})`;
    $("reason").textContent = item.reason === "sample"
      ? "captured as part of the random sample of all traffic"
      : `captured because the model was unsure: top ${pct(item.confidence)}, margin ${pct(item.margin)}`;
    const rows = item.top.map(([label, p]) => {
      const tr = document.createElement("tr");
      const name = document.createElement("td");
      name.textContent = label;
      const bar = document.createElement("td");
      const meter = document.createElement("meter");
      meter.min = 0; meter.max = 1; meter.value = p;
      bar.append(meter);
      const num = document.createElement("td");
      num.className = "p";
      num.textContent = pct(p);
      tr.append(name, bar, num);
      return tr;
    });
    $("top").replaceChildren(...rows);
    $("current").textContent = item.status === "new" ? "" : `now: ${item.status}` +
      (item.label ? ` as ${item.label}` : "") + (item.labelled_by ? ` by ${item.labelled_by}` : "");
    const guess = item.top.length ? item.top[0][0] : item.prediction;
    for (const b of $("buttons").children) {
      b.classList.toggle("current", b.dataset.label === item.label);
      b.classList.toggle("guess", b.dataset.label === guess);
    }
    $("empty").hidden = true;
    $("main").hidden = false;
  }

  async function act(label, status) {
    const item = S.item;
    if (!item) return;
    const r = await postJSON("/api/label", {id: item.id, label, status});
    S.done.push(item.id);
    showCounts(r.counts);
    say(status === "labelled" ? `#${item.id}: ${label}` : `#${item.id}: ${status}`);
    if (S.pos + 1 < S.ids.length) {
      S.pos += 1;
      await show();
    } else {
      await loadList();  // at the end: what is still in the filter (items passed by, new captures)
    }
  }

  async function undo() {
    const id = S.done.pop();
    if (id === undefined) { say("nothing to undo"); return; }
    const r = await postJSON("/api/label", {id, status: "new"});
    showCounts(r.counts);
    let i = S.ids.indexOf(id);
    if (i < 0) { S.ids.splice(S.pos, 0, id); i = S.pos; }
    S.pos = i;
    await show();
    say(`#${id} is new again`);
  }

  async function move(step) {
    const to = S.pos + step;
    if (to < 0 || to >= S.ids.length) { say(step < 0 ? "first item" : "last item"); return; }
    S.pos = to;
    await show();
  }

  const topGuess = () => S.item && (S.item.top.length ? S.item.top[0][0] : S.item.prediction);
  const ACTIONS = {
    accept: () => S.item && act(topGuess(), "labelled"),
    skip: () => act(null, "skipped"),
    unclear: () => act(null, "unclear"),
    undo: undo,
    prev: () => move(-1),
    next: () => move(1),
  };
  const KEYS = {Enter: "accept", s: "skip", u: "unclear", z: "undo", Backspace: "undo",
                ArrowLeft: "prev", ArrowRight: "next"};

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t && ["INPUT", "SELECT", "TEXTAREA"].includes(t.tagName)) return;
    let job = null;
    if (/^[0-9]$/.test(e.key)) {
      const i = (Number(e.key) + 9) % 10;  // 1 -> the first class, 0 -> the tenth
      if (i < S.classes.length) job = () => act(S.classes[i], "labelled");
    } else {
      const name = KEYS[e.key] || KEYS[e.key.toLowerCase()];
      if (name) job = ACTIONS[name];
    }
    if (!job) return;
    e.preventDefault();  // Enter must not also press a focused button, Backspace must not go back
    if (e.repeat && !e.key.startsWith("Arrow")) return;  // a held key labels one item, not a run of them
    queue(job);
  });

  for (const name of Object.keys(ACTIONS)) {
    $(name).addEventListener("click", (e) => { e.currentTarget.blur(); queue(ACTIONS[name]); });
  }
  $("filter").addEventListener("change", (e) => {
    S.filter = e.target.value;
    e.target.blur();  // the keys work again at once
    queue(loadList);
  });
  $("export").addEventListener("click", (e) => {
    if (!token) return;  // the plain link downloads it; with a token the request needs its header
    e.preventDefault();
    queue(async () => {
      const url = URL.createObjectURL(await (await api("/api/export")).blob());
      const a = document.createElement("a");
      a.href = url;
      a.download = "labels.csv";
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    });
  });
  $("import").addEventListener("change", (e) => {
    const input = e.target;
    const file = input.files[0];
    if (!file) return;
    queue(async () => {
      try {
        const r = await api("/api/import?name=" + encodeURIComponent(file.name), {
          method: "POST", headers: {"Content-Type": "text/csv"}, body: await file.text()});
        const done = await r.json();
        await loadList();
        say(`imported ${done.imported} labels from ${file.name}`);
      } finally {
        input.value = "";
        input.blur();
      }
    });
  });

  queue(loadList);
})();
"""

FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           'fill="#2b6cb0"/><path d="M4 8l3 3 5-6" stroke="white" stroke-width="2" fill="none"/></svg>')
