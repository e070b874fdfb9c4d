/* memento-edge LAN page: plain JavaScript, no build step, no external assets.
 *
 * Rules this file keeps:
 *  - memory text comes from agents and may hold markup or script: it is only ever written with
 *    textContent / createTextNode, never innerHTML;
 *  - the token lives in sessionStorage (this tab only) and travels only in the Authorization header,
 *    never in a URL.
 */
(function () {
  "use strict";

  var TOKEN_KEY = "memento-edge.token";
  var recentCursor = null;

  function $(id) { return document.getElementById(id); }

  // ---- token -----------------------------------------------------------------------------------
  function getToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function setToken(value) {
    try {
      if (value) { sessionStorage.setItem(TOKEN_KEY, value); } else { sessionStorage.removeItem(TOKEN_KEY); }
    } catch (e) { /* storage disabled: the token then lasts until reload only */ }
    memToken = value;
    showTokenState();
  }

  var memToken = getToken();
  var tokenName = "";  // the name the service gave the token in use (X-Memento-Token), once one worked

  function showTokenState() {
    $("token-state").textContent = memToken ? "A token is set for this tab." : "No token set.";
    $("token-name").textContent = tokenName ? "in use: " + tokenName
      : (memToken ? "set, not checked yet" : (authRequired() ? "needed" : "not needed on this machine"));
  }

  function authRequired() { return $("token-card").getAttribute("data-auth-required") !== "no"; }

  /** Fold the token card once a token works (or none is needed); open it when the service refuses. */
  function tokenWorks(ok) {
    $("token-card").open = !ok;
    if (!ok) { tokenName = ""; }
    showTokenState();
  }

  // ---- API ---------------------------------------------------------------------------------------
  function ApiError(status, code, message, field) {
    this.status = status; this.code = code; this.message = message; this.field = field;
  }

  /** Call the JSON API; resolves with the parsed body, rejects with an ApiError. */
  function api(method, path, body) {
    var headers = { "Accept": "application/json" };
    if (memToken) { headers["Authorization"] = "Bearer " + memToken; }
    var init = { method: method, headers: headers, cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (resp) {
      var name = resp.headers.get("X-Memento-Token");
      if (resp.ok && name && memToken && name !== tokenName) { tokenName = name; showTokenState(); }
      if (resp.status === 401) { tokenWorks(false); }
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        if (resp.ok) { return data || {}; }
        var err = (data && data.error) || {};
        throw new ApiError(resp.status, err.code || "http_" + resp.status,
                           err.message || resp.statusText || "request failed", err.field || null);
      });
    }, function () {
      throw new ApiError(0, "network", "cannot reach the service", null);
    });
  }

  function describeError(err) {
    if (!(err instanceof ApiError)) { return "Unexpected error: " + String(err); }
    if (err.status === 401) { return "Not authorised: enter a valid token under Access token."; }
    if (err.status === 403) { return "This token may not do that."; }
    if (err.status === 429) { return "Too many requests: wait a moment and retry."; }
    var text = err.message;
    if (err.field) { text += " (" + err.field + ")"; }
    return text;
  }

  function say(el, text, isError) {
    el.textContent = text;
    el.classList.toggle("err", !!isError);
  }

  // ---- helpers -----------------------------------------------------------------------------------
  function parseTags(text) {
    var seen = {}, out = [];
    text.split(",").forEach(function (t) {
      t = t.trim();
      if (t && !seen[t]) { seen[t] = true; out.push(t); }
    });
    return out;
  }

  function parseNumber(text) {
    if (text.trim() === "") { return null; }
    var n = Number(text);
    return isFinite(n) ? n : NaN;
  }

  function formatDate(iso) {
    if (!iso) { return ""; }
    var d = new Date(iso);
    return isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  /** One memory as a list item; `item.text` and every other field are set as text, never as HTML. */
  function renderItem(item, withScore) {
    var li = el("li", "hit");
    li.setAttribute("data-id", String(item.id));
    li.appendChild(el("p", "hit-text", item.text));
    var meta = el("p", "meta");
    if (withScore) { meta.appendChild(el("span", "score", scoreText(item))); }
    meta.appendChild(el("span", null, "#" + item.id));
    if (item.collection) { meta.appendChild(el("span", "coll", item.collection)); }
    if (typeof item.importance === "number") {
      meta.appendChild(el("span", null, "importance " + item.importance.toFixed(2)));
    }
    if (item.created_at) {
      var time = el("time", null, formatDate(item.created_at));
      time.setAttribute("datetime", String(item.created_at));
      meta.appendChild(time);
    }
    if (item.clock_trusted === false) {
      // Stored while the board's clock was not synchronised (no RTC, no network yet): the date may be wrong.
      var unverified = el("span", "unverified", "time unverified");
      unverified.title = "Stored before the clock was synchronised; the date may be wrong.";
      meta.appendChild(unverified);
    }
    (item.tags || []).forEach(function (t) { meta.appendChild(el("span", "tag", t)); });
    if (item.embedding === "pending") {
      // Found by its words now; search by meaning finds it once the background worker embeds it.
      meta.appendChild(el("span", "pending", "embedding pending"));
    }
    li.appendChild(meta);
    var actions = el("div", "actions");
    var edit = el("button", "secondary", "Edit");
    edit.type = "button";
    edit.setAttribute("aria-label", "Edit memory " + item.id);
    edit.addEventListener("click", function () { startEdit(item, li, withScore); });
    var del = el("button", "secondary", "Delete");
    del.type = "button";
    del.setAttribute("aria-label", "Delete memory " + item.id);
    del.addEventListener("click", function () { deleteMemory(item.id, li); });
    actions.appendChild(edit);
    actions.appendChild(del);
    li.appendChild(actions);
    return li;
  }

  /** How well a hit matches, in words a person reads: cosine as a percentage, else its keyword rank
   *  (hybrid and keyword scores are relative to the other hits and say little on their own). */
  function scoreText(item) {
    if (typeof item.similarity === "number") {
      return Math.round(Math.max(0, item.similarity) * 100) + "% match";
    }
    if (typeof item.keyword_rank === "number") { return "word match #" + item.keyword_rank; }
    return typeof item.score === "number" ? "score " + item.score.toFixed(2) : "";
  }

  function field(form, id, labelText, input) {
    var label = el("label", null, labelText);
    label.htmlFor = id;
    input.id = id;
    form.appendChild(label);
    form.appendChild(input);
    return input;
  }

  /** Edit a memory in place: text and tags; a changed text is re-embedded by the service. */
  function startEdit(item, li, withScore) {
    if (li.querySelector("form.edit")) { return; }
    var form = el("form", "edit");
    form.method = "post";
    form.action = "#";
    var text = field(form, "edit-text-" + item.id, "Text", el("textarea"));
    text.rows = 3;
    text.value = item.text;
    var tags = field(form, "edit-tags-" + item.id, "Tags (comma-separated)", el("input"));
    tags.type = "text";
    tags.value = (item.tags || []).join(", ");
    var row = el("div", "row");
    var save = el("button", null, "Save");
    save.type = "submit";
    var cancel = el("button", "secondary", "Cancel");
    cancel.type = "button";
    row.appendChild(save);
    row.appendChild(cancel);
    form.appendChild(row);
    var status = el("p", "msg");
    status.setAttribute("role", "status");
    form.appendChild(status);
    cancel.addEventListener("click", function () { form.remove(); });
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var body = {};
      if (text.value !== item.text) { body.text = text.value; }
      var newTags = parseTags(tags.value);
      if (newTags.join("\n") !== (item.tags || []).join("\n")) { body.tags = newTags; }
      if (!Object.keys(body).length) { form.remove(); return; }
      save.disabled = true;
      say(status, "Saving...", false);
      api("PATCH", "/v1/memories/" + encodeURIComponent(item.id), body).then(function (rec) {
        var updated = Object.assign({}, item, rec);
        if (body.text !== undefined) { updated.similarity = null; updated.keyword_rank = null; updated.score = null; }
        li.replaceWith(renderItem(updated, withScore));
      }, function (err) {
        save.disabled = false;
        say(status, describeError(err), true);
      });
    });
    li.appendChild(form);
    text.focus();
  }

  function deleteMemory(id, li) {
    if (!window.confirm("Delete memory #" + id + "?")) { return; }
    api("DELETE", "/v1/memories/" + encodeURIComponent(id)).then(function () {
      li.remove();
    }, function (err) {
      window.alert(describeError(err));
    });
  }

  // ---- search ------------------------------------------------------------------------------------
  function onSearch(ev) {
    ev.preventDefault();
    var status = $("search-status"), list = $("results");
    var query = $("q").value.trim();
    if (!query) { say(status, "Type something to search for.", true); return; }
    var topk = parseNumber($("topk").value);
    var body = { query: query, mode: $("mode").value, topk: topk === null || isNaN(topk) ? 10 : topk };
    var filters = {};
    var coll = $("f-collection").value.trim();
    if (coll) { filters.collection = coll; }
    var tags = parseTags($("f-tags").value);
    if (tags.length) { filters[$("f-tags-all").checked ? "tags_all" : "tags_any"] = tags; }
    var minImp = parseNumber($("f-min-imp").value);
    if (minImp !== null) {
      if (isNaN(minImp)) { say(status, "Minimum importance must be a number.", true); return; }
      filters.min_importance = minImp;
    }
    if (Object.keys(filters).length) { body.filters = filters; }
    say(status, "Searching...", false);
    $("search-btn").disabled = true;
    api("POST", "/v1/recall", body).then(function (res) {
      list.textContent = "";
      var hits = res.hits || [];
      hits.forEach(function (h) { list.appendChild(renderItem(h, true)); });
      var msg = hits.length + (hits.length === 1 ? " result" : " results");
      if (res.mode) { msg += " (" + res.mode + ")"; }
      if (typeof res.took_ms === "number") { msg += " in " + res.took_ms.toFixed(1) + " ms"; }
      if (res.note) { msg += ". " + res.note; }
      say(status, msg + ".", false);
    }, function (err) {
      list.textContent = "";
      say(status, describeError(err), true);
    }).then(function () { $("search-btn").disabled = false; });
  }

  // ---- add ---------------------------------------------------------------------------------------
  function onAdd(ev) {
    ev.preventDefault();
    var status = $("add-status");
    var text = $("add-text").value;
    if (!text.trim()) { say(status, "Write the memory first.", true); return; }
    var body = { text: text, tags: parseTags($("add-tags").value) };
    var coll = $("add-collection").value.trim();
    if (coll) { body.collection = coll; }
    var imp = parseNumber($("add-imp").value);
    if (imp !== null) {
      if (isNaN(imp)) { say(status, "Importance must be a number.", true); return; }
      body.importance = imp;
    }
    say(status, "Saving...", false);
    $("add-btn").disabled = true;
    api("POST", "/v1/memories", body).then(function (res) {
      var msg = "Saved as #" + res.id + ".";
      if (res.created === false) {
        msg = "Already known as #" + (res.duplicate_of || res.id) + ".";
      }
      if (res.embedding === "pending") {
        msg += " Embedding pending: keyword search finds it now, meaning search once it is embedded.";
      }
      say(status, msg, false);
      $("add-text").value = "";
    }, function (err) {
      say(status, describeError(err), true);
    }).then(function () { $("add-btn").disabled = false; });
  }

  // ---- recent ------------------------------------------------------------------------------------
  function loadRecent(more) {
    var status = $("recent-status"), list = $("recent");
    var path = "/v1/memories?limit=20";
    if (more && recentCursor) { path += "&cursor=" + encodeURIComponent(recentCursor); }
    say(status, "Loading...", false);
    api("GET", path).then(function (res) {
      if (!more) { list.textContent = ""; }
      var items = res.items || res.memories || [];
      items.forEach(function (m) { list.appendChild(renderItem(m, false)); });
      recentCursor = res.next_cursor || null;
      $("recent-more").hidden = !recentCursor;
      say(status, list.children.length ? "" : "No memories yet.", false);
    }, function (err) {
      say(status, describeError(err), true);
    });
  }

  // ---- stats -------------------------------------------------------------------------------------
  /** Flatten a stats object into at most `limit` "a.b: value" rows. */
  function flatten(obj, prefix, out, limit) {
    Object.keys(obj || {}).forEach(function (k) {
      if (out.length >= limit) { return; }
      var v = obj[k], key = prefix ? prefix + "." + k : k;
      if (v !== null && typeof v === "object" && !Array.isArray(v)) {
        flatten(v, key, out, limit);
      } else {
        out.push([key, Array.isArray(v) ? v.join(", ") : String(v)]);
      }
    });
    return out;
  }

  function get(obj, path) {
    return path.split(".").reduce(function (o, k) { return o && typeof o === "object" ? o[k] : undefined; }, obj);
  }

  function formatBytes(n) {
    if (typeof n !== "number") { return String(n); }
    if (n >= 1048576) { return (n / 1048576).toFixed(1) + " MB"; }
    if (n >= 1024) { return (n / 1024).toFixed(0) + " kB"; }
    return n + " B";
  }

  /** The few numbers a person wants first; every row is skipped when the server does not report it. */
  var SUMMARY = [
    ["Memories", function (s) { return s.memories; }],
    ["Database size", function (s) {
      return s.db_bytes === undefined ? undefined : formatBytes(s.db_bytes) +
        (s.wal_bytes ? " (+ " + formatBytes(s.wal_bytes) + " journal)" : "");
    }],
    ["Model", function (s) {
      var state = s.model_state, backend = get(s, "embedder.backend");
      return state === undefined ? undefined : state + (backend ? " (" + backend + ")" : "");
    }],
    ["Embedding backlog", function (s) {
      var b = s.backlog;
      if (!b || typeof b.pending !== "number") { return undefined; }
      if (!b.pending) { return "none (" + b.mode + " mode)"; }
      var text = b.pending + " pending, " + b.drain_per_min + "/min lately";
      if (typeof b.eta_s === "number") { text += ", about " + Math.ceil(b.eta_s / 60) + " min left"; }
      return text + (b.failed ? " (" + b.failed + " failed)" : "");
    }],
    ["Embedding cache hits", function (s) {
      var rate = get(s, "embedder.cache.hit_rate");
      return typeof rate === "number" ? (rate * 100).toFixed(0) + " %" : undefined;
    }],
    ["Service memory", function (s) {
      var rss = get(s, "server.governor.rss_bytes");
      return typeof rss === "number" ? formatBytes(rss) : undefined;
    }],
    ["Clock", function (s) {
      var c = s.clock;
      if (!c) { return undefined; }
      var text = c.trusted ? "trusted (" + c.source + ")" : "NOT synchronised yet (" + c.source + ")";
      return c.untrusted_memories ? text + "; " + c.untrusted_memories + " memories with an unverified time"
                                  : text;
    }],
    ["Up for", function (s) {
      var up = get(s, "server.uptime_seconds");
      if (typeof up !== "number") { return undefined; }
      var h = Math.floor(up / 3600), m = Math.floor((up % 3600) / 60);
      return h ? h + " h " + m + " min" : m + " min";
    }]
  ];

  function fill(dl, rows) {
    dl.textContent = "";
    rows.forEach(function (row) {
      dl.appendChild(el("dt", null, row[0]));
      dl.appendChild(el("dd", null, row[1]));
    });
  }

  function loadStats() {
    var status = $("stats-status");
    say(status, "Loading...", false);
    return api("GET", "/v1/stats").then(function (res) {
      var summary = [];
      SUMMARY.forEach(function (item) {
        var v = item[1](res);
        if (v !== undefined && v !== null) { summary.push([item[0], String(v)]); }
      });
      fill($("stats"), summary);
      fill($("stats-all"), flatten(res, "", [], 200));
      $("stats-more").hidden = false;
      say(status, "", false);
      return true;
    }, function (err) {
      fill($("stats"), []);
      fill($("stats-all"), []);
      $("stats-more").hidden = true;
      say(status, describeError(err), true);
      return false;
    });
  }

  /** Copy a setup command. The Clipboard API exists only on https or localhost (not on a LAN address over
      http), so the fallback selects the text and uses the older execCommand. */
  function copyCommand(ev) {
    var box = $(ev.currentTarget.getAttribute("data-copy"));
    var done = function () { say($("mcp-status"), "Copied. Replace YOUR_TOKEN with your token.", false); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(box.value).then(done, function () { box.select(); });
      return;
    }
    box.focus();
    box.select();
    if (document.execCommand && document.execCommand("copy")) { done(); } else {
      say($("mcp-status"), "Selected: press Ctrl+C (Cmd+C) to copy.", false);
    }
  }

  // ---- wiring ------------------------------------------------------------------------------------
  /** On load: fold the token card when the kept token (or no token, where none is needed) works. */
  function checkAccess() {
    if (!memToken && authRequired()) { tokenWorks(false); return; }
    api("GET", "/v1/memories?limit=1").then(function () { tokenWorks(true); }, function (err) {
      if (err.status === 401) { tokenWorks(false); }
    });
  }

  function init() {
    // A kept token (or none needed): fold the card at once; checkAccess reopens it if refused.
    if (memToken || !authRequired()) { $("token-card").open = false; }
    showTokenState();
    checkAccess();
    if (!$("token-card").open) { $("q").focus(); }
    $("token-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var value = $("token").value.trim();
      $("token").value = "";
      setToken(value);
      if (value) {
        loadStats().then(function (ok) {
          tokenWorks(ok);
          $("token-state").textContent = ok ? "Token accepted." : "Token set, but the service refused it.";
          if (ok) { $("q").focus(); }
        });
      }
    });
    $("token-clear").addEventListener("click", function () {
      setToken("");
      tokenName = "";
      showTokenState();
      fill($("stats"), []);
      fill($("stats-all"), []);
      $("stats-more").hidden = true;
    });
    $("search-form").addEventListener("submit", onSearch);
    $("add-form").addEventListener("submit", onAdd);
    $("recent-btn").addEventListener("click", function () { loadRecent(false); });
    $("recent-more").addEventListener("click", function () { loadRecent(true); });
    $("stats-btn").addEventListener("click", loadStats);
    Array.prototype.forEach.call(document.querySelectorAll("button.copy"), function (b) {
      b.addEventListener("click", copyCommand);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
}());
