// Kizuna screens: one script for every role, embedded in the binary and
// loaded with `defer` (the CSP allows no inline code). It fills the
// server-rendered skeleton from the JSON API and the server-sent events.
//
// Safety rule: text from the data is only ever placed with textContent or
// setAttribute (through el()); this file never assigns innerHTML, so a
// name like <img onerror=…> is shown as the characters it is.
"use strict";

(function () {
  const B = document.body;
  const D = JSON.parse(B.dataset.i18n || "{}");
  const LANG = B.dataset.lang || "ja";
  const SCREEN = B.dataset.screen || "";
  const CSRF = B.dataset.csrf || "";
  const SHELTER = B.dataset.shelter || "";
  const $ = (id) => document.getElementById(id);

  // A word of the current language, with {placeholders} filled.
  function T(key, vars) { return fill(D[key] || key, vars); }
  // The same for a key built at run time.
  function Tdyn(key, vars) { return fill(D[key] || key, vars); }
  function fill(s, vars) {
    if (vars) for (const k of Object.keys(vars)) s = s.split("{" + k + "}").join(String(vars[k]));
    return s;
  }

  // el("li", {class: "x"}, "text", childNode, ...): text children become
  // text nodes; attributes are set with setAttribute.
  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    if (attrs) for (const k of Object.keys(attrs)) {
      const v = attrs[k];
      if (v === false || v === null || v === undefined) continue;
      n.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of kids) {
      if (c === null || c === undefined || c === false) continue;
      n.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return n;
  }
  // A name exactly as stored, isolated from the text around it.
  const bdi = (s) => el("bdi", null, s || "");
  function clear(n) { while (n && n.firstChild) n.removeChild(n.firstChild); return n; }

  function opId() {
    const b = new Uint8Array(12);
    crypto.getRandomValues(b);
    return "ui-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function fmtTime(ms) {
    if (!ms) return "";
    return new Date(ms).toLocaleString(LANG === "ja" ? "ja-JP" : "en-GB",
      { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" });
  }
  function minutesAgo(ms) { return Math.max(0, Math.floor((Date.now() - ms) / 60000)); }

  class ApiErr extends Error {
    constructor(code, message, status) { super(message); this.code = code; this.status = status; }
  }

  async function api(method, path, body) {
    const opts = { method: method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    if (method !== "GET") opts.headers["X-CSRF-Token"] = CSRF;
    let r;
    try { r = await fetch(path, opts); } catch (e) { throw new ApiErr("network", String(e), 0); }
    let j = null;
    try { j = await r.json(); } catch (e) { j = null; }
    if (!r.ok) {
      const code = j && j.error ? j.error.code : "unavailable";
      const msg = j && j.error ? j.error.message : String(r.status);
      if (r.status === 401) setTimeout(() => { location.href = "/ui/login"; }, 2500);
      throw new ApiErr(code, msg, r.status);
    }
    return j;
  }

  // An API error as a sentence in the screen's language, the API's own
  // (English) words beside it.
  function errText(e) {
    let key = "err." + e.code;
    const m = /^([a-z_]+): /.exec(e.message || "");
    if (e.code === "rejected" && m && D["err." + m[1]]) key = "err." + m[1];
    const sentence = D[key] ? Tdyn(key) : Tdyn("err.unavailable");
    return sentence + (e.message ? " (" + e.message + ")" : "");
  }
  function show(node, text, isError) {
    if (!node) return;
    clear(node);
    node.className = "result" + (isError ? " error" : "");
    if (text) node.appendChild(document.createTextNode(text));
  }
  function showErr(node, e) { show(node, errText(e), true); }

  function debounce(fn, ms) {
    let t = null;
    return function () { if (t) clearTimeout(t); t = setTimeout(() => { t = null; fn(); }, ms); };
  }

  // Runs the async `fn` at once when idle; calls while it runs (or within
  // `gapMs`, or as long as it took, after it) fold into one more run. Unlike a debounce, a steady
  // stream of events never holds the screen back, and it never queues a
  // request per event.
  function coalesce(fn, gapMs) {
    let running = false, again = false;
    async function go() {
      running = true;
      const t0 = performance.now();
      try { await fn(); } catch (e) { /* fn shows its own errors */ }
      // Rest at least as long as the refresh took: a slow server is never
      // asked more than every other moment, a fast one promptly.
      setTimeout(() => {
        running = false;
        if (again) { again = false; go(); }
      }, Math.max(gapMs, performance.now() - t0));
    }
    return function () { if (running) again = true; else go(); };
  }

  // ----- banners: connection to headquarters, clock, card reader --------
  let lastStatus = null;
  function renderBanners() {
    const box = clear($("banners"));
    if (!box || !lastStatus) return;
    const s = lastStatus;
    if (s.role !== "hq") {
      const hqs = (s.peers || []).filter((p) => p.role === "hq");
      const up = hqs.some((p) => p.connected);
      if (!up) {
        const last = Math.max(0, ...hqs.map((p) => p.last_sync || 0));
        const text = last ? T("banner.offline", { n: minutesAgo(last) }) : T("banner.offline_never");
        box.appendChild(el("div", { class: "banner bad", id: "offline-banner" }, "⚠ " + text));
      }
    }
    if (s.clock && s.clock.trusted === false) {
      box.appendChild(el("div", { class: "banner warn" }, "⚠ " + T("banner.clock")));
    }
  }
  function renderCardStatus(c) {
    const n = $("card-status");
    if (!n) return;
    if (!c) { n.textContent = T("card.none"); n.classList.add("degraded"); return; }
    const text = LANG === "ja" ? c.message_ja : c.message_en;
    n.textContent = (c.degraded ? "⚠ " : "") + (text || "");
    n.classList.toggle("degraded", !!c.degraded);
    n.dataset.status = c.status || "";
  }
  async function refreshStatus() {
    try {
      lastStatus = await api("GET", "/api/v1/status");
      renderBanners();
      renderCardStatus(lastStatus.card_reader);
      if (SCREEN === "hq") renderMesh(lastStatus);
    } catch (e) { /* the banner stays as it was; the next poll retries */ }
  }

  // ----- live events ------------------------------------------------------
  const handlers = [];
  function onEvent(fn) { handlers.push(fn); }
  function startEvents() {
    const es = new EventSource("/api/v1/events");
    es.onmessage = (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      for (const h of handlers) h(ev);
    };
    return es;
  }

  // ----- locations ----------------------------------------------------------
  function whereTag(loc) {
    const wrap = el("span", { class: "where" });
    if (!loc) {
      wrap.appendChild(el("span", { class: "tag nowhere" }, T("where.nowhere")));
      return wrap;
    }
    const here = SHELTER && loc.shelter_id === SHELTER;
    const status = loc.status || "in";
    wrap.appendChild(el("span", { class: "tag " + status },
      Tdyn("where." + status) + " · ", bdi(here ? T("where.here") : loc.shelter_id)));
    if (loc.conflict) {
      wrap.appendChild(document.createTextNode(" "));
      wrap.appendChild(el("span", { class: "tag conflict", title: T("conflict") }, "⚠ " + T("conflict.short")));
    }
    return wrap;
  }

  // ----- search (every screen) ---------------------------------------------
  function initSearch(onSelect) {
    const form = $("search-form");
    if (!form) return;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = clear($("search-results"));
      const q = $("q").value.trim();
      const birth = $("birth").value;
      let path = "/api/v1/search?q=" + encodeURIComponent(q);
      if (birth) path += "&birth_date=" + encodeURIComponent(birth);
      try {
        const list = await api("GET", path);
        if (!list.length) { out.appendChild(el("li", null, T("search.none"))); return; }
        for (const p of list) {
          const btn = el("button", { type: "button", class: "secondary" }, T("search.select"));
          btn.setAttribute("aria-label", T("search.select") + ": " + (p.name || ""));
          btn.addEventListener("click", () => onSelect(p));
          out.appendChild(el("li", { "data-person": p.person_id },
            el("strong", null, bdi(p.name)), el("span", { class: "hint" }, bdi(p.kana)),
            el("span", { class: "hint" }, p.birth_date || ""), btn));
        }
      } catch (e) { out.appendChild(el("li", { class: "error" }, errText(e))); }
    });
  }

  // ===== shelter desk ========================================================
  function shelterDesk(canCheckIn) {
    let members = [];

    function render() {
      const box = clear($("household"));
      if (!members.length) { box.appendChild(el("p", { class: "hint" }, T("household.none"))); return; }
      box.appendChild(el("h3", null, T("household.title")));
      if (canCheckIn) box.appendChild(el("p", { class: "hint" }, T("household.hint")));
      const ul = el("ul", { class: "members", id: "members" });
      members.forEach((m, i) => {
        const loc = m.location;
        const inHere = loc && loc.status === "in" && loc.shelter_id === SHELTER;
        const cb = el("input", { type: "checkbox", id: "member-" + i, "data-person": m.person_id });
        cb.checked = !inHere;
        if (!canCheckIn) cb.disabled = true;
        const label = el("label", { for: "member-" + i },
          cb, el("span", { class: "name" }, bdi(m.name)), el("span", { class: "kana" }, bdi(m.kana)),
          el("span", { class: "birth" }, m.birth_date || ""));
        ul.appendChild(el("li", { "data-person": m.person_id }, label, whereTag(loc)));
      });
      box.appendChild(ul);
      if (!canCheckIn) return;
      const actions = el("div", { class: "actions" });
      const mk = (id, key, fn, cls) => {
        const b = el("button", { type: "button", id: id, class: cls || null }, T(key));
        b.addEventListener("click", fn);
        actions.appendChild(b);
      };
      mk("do-checkin", "checkin", () => act("checkin"));
      mk("do-checkout", "checkout", () => act("checkout"), "secondary");
      if (members.some((m) => m.location && m.location.status === "in" && m.location.shelter_id !== SHELTER)) {
        mk("do-transfer", "transfer", () => act("transfer"), "secondary");
      }
      box.appendChild(actions);
    }

    function selected() {
      return Array.from(document.querySelectorAll("#members input[type=checkbox]"))
        .filter((c) => c.checked).map((c) => c.dataset.person);
    }

    let busy = false;
    async function act(kind) {
      let ids = selected();
      const out = $("intake-result");
      if (kind === "transfer") {
        // Only those checked in at another shelter move here.
        ids = ids.filter((id) => {
          const m = members.find((x) => x.person_id === id);
          return m && m.location && m.location.status === "in" && m.location.shelter_id !== SHELTER;
        });
      }
      if (!ids.length) { show(out, T("select_someone"), true); return; }
      if (busy) return;
      busy = true;
      // The household is drawn anew after the action: a keyboard user's
      // focus goes back to the button they pressed, not to the page top.
      const pressed = document.activeElement && $("household").contains(document.activeElement)
        ? document.activeElement.id : null;
      document.querySelectorAll("#household button").forEach((b) => { b.disabled = true; });
      try {
        let done = 0, already = 0;
        if (kind === "transfer") {
          // A shelter records presence only for itself: the arrival from
          // another shelter is a check-in here. It follows the other
          // shelter's check-in in the person's history, so the move is an
          // ordered one, never a conflict.
          const r = await api("POST", "/api/v1/checkins", { person_ids: ids, op_id: opId() });
          done = r.event_ids.length; already = r.already.length;
        } else {
          const r = await api("POST", kind === "checkin" ? "/api/v1/checkins" : "/api/v1/checkouts",
            { person_ids: ids, op_id: opId() });
          done = r.event_ids.length; already = r.already.length;
        }
        let msg = Tdyn("done." + kind, { n: done });
        if (already) msg += " · " + T("done.already", { n: already });
        show(out, "✔ " + msg, false);
        await refreshMembers();
        refreshRoster();
      } catch (e) {
        showErr(out, e);
      } finally {
        busy = false;
        document.querySelectorAll("#household button").forEach((b) => { b.disabled = false; });
        const lost = !document.activeElement || document.activeElement === document.body;
        if (pressed && lost && $(pressed)) $(pressed).focus();
      }
    }

    // Which opening of the household panel is on screen. A refresh still on
    // its way when staff open another person or household must not bring
    // the old one back under their fingers.
    let opened = 0;
    function setMembers(list) { opened++; members = list; }

    async function refreshMembers() {
      const mine = opened;
      const fresh = [];
      B.dataset.membersRefreshing = String(Number(B.dataset.membersRefreshing || 0) + 1);
      try {
        for (const m of members) {
          try {
            const p = await api("GET", "/api/v1/persons/" + encodeURIComponent(m.person_id));
            fresh.push(Object.assign({}, m, { location: p.location }));
          } catch (e) { fresh.push(m); }
        }
        if (mine !== opened) return;
        members = fresh;
        render();
      } finally {
        B.dataset.membersRefreshing = String(Number(B.dataset.membersRefreshing) - 1);
      }
    }

    function openMembers(list, householdId) {
      setMembers(list);
      show($("intake-result"), "", false);
      render();
      const first = document.querySelector("#members input");
      if (first) first.focus();
      // For the tap benchmark: which household is on screen, and since when
      // (after it was drawn).
      B.dataset.householdId = householdId || "";
      B.dataset.householdAt = String(Date.now());
    }

    async function openPerson(p) {
      try {
        const d = await api("GET", "/api/v1/persons/" + encodeURIComponent(p.person_id));
        openMembers([{ person_id: d.person_id, name: d.name, kana: d.kana, birth_date: d.birth_date, location: d.location }]);
      } catch (e) { showErr($("intake-result"), e); }
    }

    onEvent((ev) => {
      if (ev.type === "card_tap") {
        // For the tap benchmark: when the event reached the page, and the
        // node's own stages (ms; no identity in them).
        B.dataset.tapEventAt = String(Date.now());
        B.dataset.tapTiming = JSON.stringify(ev.timing || {});
        if (ev.household_id) openMembers(ev.members || [], ev.household_id);
        else { setMembers([]); render(); show($("intake-result"), "⚠ " + (LANG === "ja" ? ev.reason_ja : ev.reason_en), true); }
      } else if (ev.type === "card_error") {
        show($("intake-result"), "⚠ " + (LANG === "ja" ? ev.message_ja : ev.message_en), true);
      } else if (ev.type === "card_status") {
        renderCardStatus(ev);
      }
    });

    initSearch(openPerson);

    const reg = $("register-form");
    if (reg) reg.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = $("register-result");
      const body = { name: $("reg-name").value, kana: $("reg-kana").value, note: $("reg-note").value, op_id: opId() };
      if ($("reg-birth").value) body.birth_date = $("reg-birth").value;
      try {
        const r = await api("POST", "/api/v1/persons", body);
        show(out, "✔ " + T("register.done"), false);
        reg.reset();
        await openPerson({ person_id: r.person_id });
      } catch (e) { showErr(out, e); }
    });

    // The roster: who is in this shelter, filterable, with the count.
    let rosterRows = [];
    let capacity = null;
    function renderRoster() {
      const tb = clear(document.querySelector("#roster tbody"));
      const f = ($("roster-filter").value || "").trim().toLowerCase();
      let n = 0;
      for (const r of rosterRows) {
        if (r.location.status === "in") n++;
        const hay = ((r.name || "") + " " + (r.kana || "")).toLowerCase();
        if (f && !hay.includes(f)) continue;
        const st = el("td", null, Tdyn("where." + r.location.status));
        if (r.location.conflict) st.appendChild(el("span", { class: "tag conflict" }, " ⚠ " + T("conflict.short")));
        tb.appendChild(el("tr", { "data-person": r.person_id },
          el("td", null, bdi(r.name)), el("td", null, bdi(r.kana)), el("td", null, r.birth_date || ""),
          el("td", null, fmtTime(r.location.since)), st));
      }
      $("roster-count").textContent = T("roster.count", { n: n, cap: capacity === null ? "—" : capacity });
    }
    async function refreshRoster() {
      try {
        const [rows, shelters] = await Promise.all([api("GET", "/api/v1/roster"), api("GET", "/api/v1/shelters")]);
        rosterRows = rows;
        const me = shelters.find((s) => s.shelter_id === SHELTER);
        capacity = me ? me.capacity : null;
        renderRoster();
      } catch (e) { $("roster-count").textContent = errText(e); }
    }
    $("roster-filter").addEventListener("input", renderRoster);
    const later = debounce(() => { refreshRoster(); if (members.length) refreshMembers(); }, 400);
    onEvent((ev) => { if (ev.type === "document_changed" && (ev.kind === "presence" || ev.kind === "shelter")) later(); });
    refreshRoster();
  }

  // ===== ambulance and clinic ================================================
  const SECTIONS = ["allergy", "condition", "medication", "family_doctor", "emergency_contact"];

  function medicalScreen(clinic) {
    let person = null;
    let breakGlass = null; // expiry ms of our grant for this person

    function selectPerson(p) {
      person = p;
      breakGlass = null;
      const box = clear($("person"));
      box.appendChild(el("p", { class: "name", id: "person-name" }, el("strong", null, bdi(p.name)), " ",
        el("span", { class: "hint" }, bdi(p.kana)), " ", el("span", { class: "hint" }, p.birth_date || "")));
      $("reason-form").hidden = false;
      $("profile-sec").hidden = true;
      $("bg-sec").hidden = true;
      if (clinic) { $("edit-sec").hidden = true; $("elig-sec").hidden = true; }
      show($("medical-result"), "", false);
      $("reason").focus();
    }

    async function read(reason) {
      const out = $("medical-result");
      let path = "/api/v1/persons/" + encodeURIComponent(person.person_id) + "/medical?reason=" + encodeURIComponent(reason);
      if (breakGlass && breakGlass > Date.now()) path += "&break_glass=true";
      try {
        const r = await api("GET", path);
        show(out, T("medical.audited", { n: r.audit_seq }), false);
        $("bg-sec").hidden = true;
        renderProfile(r.medical);
        if (clinic) { $("edit-sec").hidden = false; loadEligibility(); }
      } catch (e) {
        $("profile-sec").hidden = true;
        showErr(out, e);
        if (/^no_consent/.test(e.message || "")) { $("bg-sec").hidden = false; $("bg-just").focus(); }
        if (e.code === "not_found") show(out, T("medical.no_profile") + " (" + e.message + ")", true);
      }
    }

    function renderProfile(m) {
      $("profile-sec").hidden = false;
      const bg = clear($("bg-banner"));
      if (breakGlass && breakGlass > Date.now()) {
        bg.appendChild(el("div", { class: "break-glass", id: "bg-active", role: "alert" },
          "⚠ " + T("bg.active", { t: fmtTime(breakGlass) })));
      }
      const box = clear($("profile"));
      box.className = "profile";
      box.appendChild(el("h3", null, bdi(person.name), " ", el("span", { class: "hint" }, bdi(person.kana)), " ",
        el("span", { class: "hint" }, person.birth_date || "")));
      const dl = el("dl");
      const row = (label, ...v) => { dl.appendChild(el("dt", null, label)); dl.appendChild(el("dd", null, ...v)); };
      const blood = el("span", { class: "blood", id: "blood-type" }, m.blood_type || "—");
      const bc = (m.blood_type_conflicts || []).map((x) => el("div", { class: "conflict-note" }, "⚠ " + T("medical.conflict") + ": " + x));
      row(T("medical.blood"), blood, ...bc);
      const c = m.consent;
      row(T("medical.consent"), c ? (c.basis === "consented" ? T("medical.consented") : T("medical.life_saving")) : T("medical.no_consent"));
      for (const s of SECTIONS) {
        const entries = (m.sections || {})[s] || [];
        let v;
        if (!entries.length) v = el("span", { class: "hint" }, T("medical.none"));
        else {
          v = el("ul", { "data-section": s });
          for (const e of entries) {
            const li = el("li", { "data-entry": e.entry_id }, bdi(e.text));
            for (const x of e.conflicts || []) li.appendChild(el("div", { class: "conflict-note" }, "⚠ " + T("medical.conflict") + ": ", bdi(x)));
            if (clinic) {
              const rm = el("button", { type: "button", class: "secondary noprint" }, T("clinic.remove"));
              rm.setAttribute("aria-label", T("clinic.remove") + ": " + e.text);
              rm.addEventListener("click", () => update({ remove: [[s, e.entry_id]] }));
              li.appendChild(document.createTextNode(" "));
              li.appendChild(rm);
            }
            v.appendChild(li);
          }
        }
        row(Tdyn("medical." + s), v);
      }
      box.appendChild(dl);
    }

    async function update(body) {
      const out = $("edit-result");
      try {
        await api("POST", "/api/v1/persons/" + encodeURIComponent(person.person_id) + "/medical", body);
        show(out, "✔ " + T("clinic.saved"), false);
        await read($("reason").value);
      } catch (e) { showErr(out, e); }
    }

    // The offline eligibility check (audited; numbers unmasked only on
    // clinic nodes, which is where this screen runs).
    async function loadEligibility() {
      $("elig-sec").hidden = false;
      const dl = clear($("elig"));
      try {
        const r = await api("GET", "/api/v1/persons/" + encodeURIComponent(person.person_id) + "/eligibility");
        const row = (k, v) => { dl.appendChild(el("dt", null, k)); dl.appendChild(el("dd", null, v)); };
        const mark = r.status === "valid" ? "✔ " : (r.status === "expired" ? "✖ " : "? ");
        row(T("elig.eligible"), el("strong", { id: "elig-status" }, mark + Tdyn("elig.s_" + r.status) + " (" + r.on_date + ")"));
        const e = r.record;
        if (!e) { row(T("elig.insurer"), T("elig.none")); return; }
        row(T("elig.insurer"), bdi(e.insurer || "—"), " · " + e.insurer_number);
        row(T("elig.number"), [e.symbol, e.number, e.branch].filter((x) => x).join(" · "));
        row(T("elig.valid"), e.valid_from + " – " + (e.valid_to || ""));
        row(T("elig.copay"), e.copay_pct + "%");
        row(T("elig.as_of"), e.as_of);
      } catch (e) { dl.appendChild(el("dd", { class: "error" }, errText(e))); }
    }

    $("reason-form").addEventListener("submit", (ev) => { ev.preventDefault(); if (person) read($("reason").value); });
    $("bg-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = $("medical-result");
      try {
        const r = await api("POST", "/api/v1/persons/" + encodeURIComponent(person.person_id) + "/break-glass",
          { reason: $("bg-reason").value, justification: $("bg-just").value });
        breakGlass = r.expires_at;
        $("bg-form").reset();
        await read($("bg-reason").value);
      } catch (e) { showErr(out, e); }
    });
    $("print-handover").addEventListener("click", () => window.print());
    if (clinic) {
      $("add-entry-form").addEventListener("submit", (ev) => {
        ev.preventDefault();
        update({ add: [[$("entry-section").value, $("entry-text").value]] }).then(() => $("add-entry-form").reset());
      });
      $("blood-form").addEventListener("submit", (ev) => { ev.preventDefault(); update({ blood_type: $("blood").value }); });
      $("consent-form").addEventListener("submit", (ev) => { ev.preventDefault(); update({ consent: $("consent").value }); });
    }

    onEvent((ev) => {
      if (ev.type === "card_tap") {
        if (ev.person_id && ev.person) selectPerson(ev.person);
        else show($("medical-result"), "⚠ " + (LANG === "ja" ? ev.reason_ja : ev.reason_en), true);
      } else if (ev.type === "card_error") {
        show($("medical-result"), "⚠ " + (LANG === "ja" ? ev.message_ja : ev.message_en), true);
      } else if (ev.type === "card_status") {
        renderCardStatus(ev);
      }
    });
    initSearch(selectPerson);
  }

  // ===== headquarters dashboard =============================================
  const STALE_MIN = 15;

  function renderMesh(s) {
    const dl = clear($("mesh"));
    if (!dl) return;
    const row = (k, v, id) => { dl.appendChild(el("dt", null, k)); dl.appendChild(el("dd", { id: id || null }, String(v))); };
    row(T("hq.violations"), s.violations, "mesh-violations");
    row(T("hq.quarantined"), s.quarantined, "mesh-quarantined");
    // Certificates on the revocation list in force (GET /api/v1/status).
    const revoked = s.revocation ? s.revocation.revoked : null;
    row(T("hq.revoked"), revoked === undefined || revoked === null ? "—" : revoked, "mesh-revoked");
    const ul = clear($("peers"));
    for (const p of s.peers || []) {
      const stale = !p.connected && (!p.last_sync || minutesAgo(p.last_sync) >= STALE_MIN);
      ul.appendChild(el("li", { "data-node": p.node_id, class: stale ? "stale" : null },
        el("strong", null, bdi(p.node_id)), el("span", { class: "hint" }, p.role),
        el("span", { class: "tag " + (p.connected ? "in" : "pending") }, (p.connected ? "● " : "○ ") + (p.connected ? T("hq.connected") : T("hq.disconnected"))),
        el("span", { class: "hint" }, p.last_sync ? T("hq.min_ago", { n: minutesAgo(p.last_sync) }) : T("hq.never"))));
    }
  }

  function hqDashboard() {
    let shelters = [];

    // Rows by shelter id with what each shows: a live update redraws only
    // the rows whose numbers changed (855 shelters at a large municipality).
    let shelterRows = new Map(), shelterOrder = "";
    function shelterRow(s, mins, stale, full) {
      const meter = el("meter", { min: 0, max: Math.max(1, s.capacity), value: Math.min(s.occupancy, Math.max(1, s.capacity)),
        "aria-label": s.occupancy + " / " + s.capacity });
      const sync = el("td", null, mins === null ? T("hq.never") : T("hq.min_ago", { n: mins }));
      if (stale) sync.appendChild(el("span", { class: "tag pending" }, " ⚠ " + T("hq.stale")));
      return el("tr", { "data-shelter": s.shelter_id, class: full ? "full" : (stale ? "stale" : null) },
        el("td", null, bdi(s.name)),
        el("td", { class: "num" }, meter, " ", el("span", { class: "occ" }, String(s.occupancy)), " / " + s.capacity + (full ? " ⚠" : "")),
        sync);
    }
    function renderShelters() {
      const tb = document.querySelector("#shelters tbody");
      const order = shelters.map((s) => s.shelter_id).join("\n");
      const whole = order !== shelterOrder || tb.rows.length !== shelters.length;
      const frag = whole ? document.createDocumentFragment() : null;
      const rows = new Map();
      let total = 0;
      for (const s of shelters) {
        total += s.occupancy;
        const mins = s.last_sync ? minutesAgo(s.last_sync) : null;
        const stale = mins === null || mins >= STALE_MIN;
        const full = s.capacity && s.occupancy >= s.capacity;
        const key = [s.name, s.capacity, s.occupancy, mins, LANG].join("\u0000");
        const old = shelterRows.get(s.shelter_id);
        let tr = old && old.key === key ? old.tr : null;
        if (!tr) {
          tr = shelterRow(s, mins, stale, full);
          if (!whole && old) old.tr.replaceWith(tr);
        }
        if (whole) frag.appendChild(tr);
        rows.set(s.shelter_id, { key, tr });
      }
      if (whole) clear(tb).appendChild(frag);
      shelterRows = rows;
      shelterOrder = order;
      B.dataset.paintedAt = String(Date.now());
      $("kpi-evacuees").textContent = String(total);
      $("kpi-shelters").textContent = String(shelters.length);
    }

    function renderArrivals(buckets) {
      const box = clear($("arrivals-chart"));
      const NS = "http://www.w3.org/2000/svg";
      const data = buckets.slice(-48);
      const W = 480, H = 180, PAD = 24;
      const max = Math.max(1, ...data.map((b) => b[1]));
      const svg = document.createElementNS(NS, "svg");
      svg.setAttribute("viewBox", "0 0 " + W + " " + H);
      svg.setAttribute("role", "img");
      const total = data.reduce((a, b) => a + b[1], 0);
      svg.setAttribute("aria-label", T("hq.arrivals") + ": " + total);
      const mk = (tag, attrs, text) => {
        const n = document.createElementNS(NS, tag);
        for (const k of Object.keys(attrs)) n.setAttribute(k, String(attrs[k]));
        if (text !== undefined) n.textContent = text;
        svg.appendChild(n);
        return n;
      };
      mk("line", { x1: PAD, y1: H - PAD, x2: W, y2: H - PAD, class: "axis" });
      const bw = data.length ? (W - PAD) / data.length : 0;
      data.forEach((b, i) => {
        const h = Math.round((H - 2 * PAD) * b[1] / max);
        const r = mk("rect", { x: PAD + i * bw + 1, y: H - PAD - h, width: Math.max(1, bw - 2), height: h, class: "bar" });
        const title = document.createElementNS(NS, "title");
        title.textContent = fmtTime(b[0]) + ": " + b[1];
        r.appendChild(title);
        if (i % Math.max(1, Math.ceil(data.length / 6)) === 0) {
          mk("text", { x: PAD + i * bw, y: H - 6 }, new Date(b[0]).getHours() + ":00");
        }
      });
      mk("text", { x: 2, y: PAD }, String(max));
      box.appendChild(svg);
    }

    function renderConflicts(list) {
      const ul = clear($("conflicts"));
      $("kpi-conflicts").textContent = String(list.length);
      if (!list.length) { ul.appendChild(el("li", { class: "hint" }, T("hq.no_conflicts"))); return; }
      for (const c of list.slice(0, 200)) {
        const li = el("li", { "data-person": c.person_id }, el("span", { class: "tag conflict" }, "⚠ " + T("conflict.short")),
          bdi(c.person_id), whereTag(c.location));
        ul.appendChild(li);
        api("GET", "/api/v1/persons/" + encodeURIComponent(c.person_id)).then((p) => {
          li.insertBefore(el("strong", null, bdi(p.name)), li.children[1]);
          const shelters = (p.conflicts || []).map((e) => e.to_shelter || e.shelter_id);
          if (shelters.length) li.appendChild(el("span", { class: "hint" }, "(" + Array.from(new Set(shelters)).join(" / ") + ")"));
        }).catch(() => {});
      }
    }

    // Rows of GET /api/v1/outbox: state pending | sent | indeterminate |
    // failed, with the last error of a failed or indeterminate send.
    function renderOutbox(list) {
      const counts = {};
      const fails = {};
      for (const m of list) {
        counts[m.state] = (counts[m.state] || 0) + 1;
        if (m.state === "failed" || m.state === "indeterminate" || (m.state === "pending" && m.last_error)) {
          const k = m.state + "\u0000" + (m.last_error || "");
          fails[k] = (fails[k] || 0) + 1;
        }
      }
      const dl = clear($("outbox-counts"));
      for (const s of ["sent", "pending", "failed", "indeterminate"]) {
        dl.appendChild(el("dt", null, Tdyn("mail." + s)));
        dl.appendChild(el("dd", { "data-status": s }, String(counts[s] || 0)));
      }
      $("kpi-mail").textContent = (counts.sent || 0) + " / " + list.length;
      const tb = clear(document.querySelector("#outbox-failures tbody"));
      for (const k of Object.keys(fails)) {
        const [state, reason] = k.split("\u0000");
        tb.appendChild(el("tr", null, el("td", null, Tdyn("mail." + state)), el("td", null, reason), el("td", { class: "num" }, String(fails[k]))));
      }
    }

    function renderBreakGlass(list) {
      const tb = clear(document.querySelector("#bg-review tbody"));
      if (!list.length) { tb.appendChild(el("tr", null, el("td", { colspan: 5, class: "hint" }, T("hq.no_break_glass")))); return; }
      for (const e of list) {
        tb.appendChild(el("tr", { class: "stale" }, el("td", null, fmtTime(e.at)), el("td", null, bdi(e.node)),
          el("td", null, bdi(e.operator)), el("td", null, e.action + " · " + e.record), el("td", null, bdi(e.reason))));
      }
    }

    let unaccountedDistrict = null;
    async function showUnaccounted(d, after) {
      const box = $("unaccounted");
      if (!after) { clear(box); unaccountedDistrict = d; box.appendChild(el("h3", null, bdi(d) , " — " + T("hq.unaccounted"))); }
      const ul = box.querySelector("ul") || box.appendChild(el("ul", { class: "results", id: "unaccounted-list" }));
      const old = box.querySelector("button.more");
      if (old) old.remove();
      try {
        const list = await api("GET", "/api/v1/unaccounted?limit=100&district=" + encodeURIComponent(d) + "&after=" + encodeURIComponent(after || ""));
        for (const p of list) ul.appendChild(el("li", { "data-person": p.person_id }, el("strong", null, bdi(p.name)), el("span", { class: "hint" }, bdi(p.kana)), el("span", { class: "hint" }, p.birth_date || "")));
        if (list.length === 100 && unaccountedDistrict === d) {
          const more = el("button", { type: "button", class: "secondary more" }, "…");
          more.addEventListener("click", () => showUnaccounted(d, list[list.length - 1].person_id));
          box.appendChild(more);
        }
      } catch (e) { box.appendChild(el("p", { class: "error" }, errText(e))); }
    }

    function renderDistricts(list) {
      const tb = clear(document.querySelector("#districts tbody"));
      const sorted = list.slice().sort((a, b) => (b.residents - b.accounted) - (a.residents - a.accounted));
      for (const d of sorted) {
        const btn = el("button", { type: "button", class: "secondary" }, T("hq.show"));
        btn.setAttribute("aria-label", T("hq.show") + ": " + d.district);
        btn.addEventListener("click", () => showUnaccounted(d.district));
        tb.appendChild(el("tr", { "data-district": d.district }, el("td", null, bdi(d.district)),
          el("td", { class: "num" }, String(d.residents)), el("td", { class: "num" }, String(d.accounted)),
          el("td", { class: "num" }, String(d.residents - d.accounted)), el("td", null, btn)));
      }
    }

    const stamp = () => { $("kpi-updated").textContent = new Date().toLocaleTimeString(LANG === "ja" ? "ja-JP" : "en-GB"); };

    // The shelter table is painted as soon as its own answer is in; the
    // chart and the conflicts follow on their own.
    async function refreshLive() {
      try {
        const s = api("GET", "/api/v1/shelters"), a = api("GET", "/api/v1/arrivals"), c = api("GET", "/api/v1/conflicts");
        shelters = await s;
        renderShelters();
        B.dataset.occupancy = String(shelters.reduce((x, y) => x + y.occupancy, 0));
        if (!B.dataset.readyMs) B.dataset.readyMs = String(Math.round(performance.now()));
        renderArrivals(await a);
        renderConflicts(await c);
        stamp();
      } catch (e) { $("kpi-updated").textContent = errText(e); }
    }
    async function refreshOutbox() { try { renderOutbox(await api("GET", "/api/v1/outbox")); } catch (e) { /* next event retries */ } }
    async function refreshAudit() { try { renderBreakGlass(await api("GET", "/api/v1/audit?break_glass_only=true&limit=100")); } catch (e) { /* retried */ } }
    async function refreshDistricts() { try { renderDistricts(await api("GET", "/api/v1/districts")); } catch (e) { /* retried */ } }

    const live = coalesce(refreshLive, 100);
    const mail = coalesce(refreshOutbox, 1000);
    const audit = coalesce(refreshAudit, 1000);
    const districts = coalesce(refreshDistricts, 5000);
    onEvent((ev) => {
      if (ev.type === "document_changed") {
        if (ev.kind === "presence" || ev.kind === "shelter") {
          // For the dashboard benchmark: when the change reached this page.
          B.dataset.eventAt = String(Date.now());
          // The district counts (a scan of every resident) wait a moment,
          // so they do not compete with the shelter table's refresh.
          live(); setTimeout(districts, 1000);
        }
        else if (ev.kind === "outbox") mail();
        else if (ev.kind === "audit") audit();
        else if (ev.kind === "registry" || ev.kind === "person") districts();
      } else if (ev.type === "lagged") { live(); mail(); audit(); districts(); }
    });
    initSearch(async (p) => {
      const out = $("search-results");
      try {
        const d = await api("GET", "/api/v1/persons/" + encodeURIComponent(p.person_id));
        clear(out).appendChild(el("li", { "data-person": d.person_id }, el("strong", null, bdi(d.name)), el("span", { class: "hint" }, bdi(d.kana)),
          el("span", { class: "hint" }, d.birth_date || ""), whereTag(d.location)));
      } catch (e) { clear(out).appendChild(el("li", { class: "error" }, errText(e))); }
    });
    // The occupancy first; the panels below it ask after it, so their
    // queries do not queue ahead of it at the node.
    refreshLive().then(() => {
      B.dataset.ready = "1";
      mail();
      audit();
      districts();
    });
    setInterval(() => { if (shelters.length) renderShelters(); }, 60000);
  }

  // ===== start ===============================================================
  function start() {
    const pb = $("print-now");
    if (pb) pb.addEventListener("click", () => window.print());
    if (SCREEN === "login" || SCREEN === "print" || !CSRF) return;
    startEvents();
    refreshStatus();
    setInterval(refreshStatus, 15000);
    // Any change that arrives may come with a new connection state: the
    // banner follows within seconds, not at the next poll.
    const statusSoon = debounce(refreshStatus, 1500);
    onEvent((ev) => { if (ev.type === "document_changed") statusSoon(); });
    if (SCREEN === "shelter") shelterDesk(true);
    else if (SCREEN === "facility") shelterDesk(false);
    else if (SCREEN === "ambulance") medicalScreen(false);
    else if (SCREEN === "clinic") medicalScreen(true);
    else if (SCREEN === "hq") hqDashboard();
  }
  start();
})();
