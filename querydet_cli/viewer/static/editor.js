// querydet view --edit: correct a model's detections on the map and save them as labels.
// Works on viewer.js's columns (window.querydetView): a box is deleted (del), edited (touch 1)
// or drawn (touch 2); reviewed areas are rectangles in source pixels. Every change is one entry
// of the undo list: the state of each box or area it touched, before and after.
(function () {
  "use strict";
  const V = window.querydetView;
  const DATA = V.DATA, B = V.B, E = DATA.edit, map = V.map, mapEl = V.mapEl;
  const names = DATA.classNames;
  const areas = [];  // {x1, y1, x2, y2, del, layer}
  const undos = [], redos = [];
  let mode = "select", selected = -1, chosenArea = -1, gesture = null, swallowClick = false;
  let outline = null, band = null, nextClass = 0, dirty = false;
  const AREA_STYLE = {color: "#00e5ff", weight: 2, dashArray: "6 4", fill: true,
                      fillOpacity: 0.06, interactive: false};

  const n0 = B.score.length;
  B.del = new Array(n0).fill(0);
  B.touch = (B.status || new Array(n0).fill("")).map((s) => s === "added" ? 2 : s === "edited" ? 1 : 0);

  // --- state and the undo list ---------------------------------------------------------------
  function boxState(i) {
    return {x1: B.x1[i], y1: B.y1[i], x2: B.x2[i], y2: B.y2[i], cls: B.cls[i], del: B.del[i],
            touch: B.touch[i]};
  }
  function setBox(i, s) {
    B.x1[i] = s.x1; B.y1[i] = s.y1; B.x2[i] = s.x2; B.y2[i] = s.y2;
    B.cls[i] = s.cls; B.group[i] = s.cls; B.del[i] = s.del; B.touch[i] = s.touch;
  }
  function areaState(k) {
    const a = areas[k];
    return {x1: a.x1, y1: a.y1, x2: a.x2, y2: a.y2, del: a.del};
  }
  function setArea(k, s) { Object.assign(areas[k], s); }
  function put(change, which) {
    (change.kind === "box" ? setBox : setArea)(change.i, change[which]);
  }
  function commit(changes) {
    changes.forEach((c) => put(c, "after"));
    undos.push(changes);
    redos.length = 0;
    changed();
  }
  function undo() {
    const changes = undos.pop();
    if (!changes) return;
    changes.slice().reverse().forEach((c) => put(c, "before"));
    redos.push(changes);
    changed();
  }
  function redo() {
    const changes = redos.pop();
    if (!changes) return;
    changes.forEach((c) => put(c, "after"));
    undos.push(changes);
    changed();
  }
  function changed() {
    dirty = true;
    if (selected >= 0 && B.del[selected]) selected = -1;
    if (chosenArea >= 0 && areas[chosenArea].del) chosenArea = -1;
    V.refresh();
    drawAreas();
    drawSelection();
    mapEl.dataset.edits = String(undos.length);
    mapEl.dataset.labels = String(payload().boxes.length);
    mapEl.dataset.areas = String(areas.filter((a) => !a.del).length);
    document.getElementById("qd-undo").disabled = !undos.length;
    document.getElementById("qd-redo").disabled = !redos.length;
  }

  // --- edits ---------------------------------------------------------------------------------
  function edited(i, coords) {  // a box's state after a move, resize or class change
    const s = Object.assign(boxState(i), coords);
    if (s.touch === 0) s.touch = 1;
    return s;
  }
  function addBox(x1, y1, x2, y2) {
    const i = B.score.length;
    ["x1", "y1", "x2", "y2", "score", "group", "cls", "source", "del", "touch"].forEach((c) => B[c].push(0));
    B.score[i] = 1; B.source[i] = E.source;
    const before = {x1: x1, y1: y1, x2: x2, y2: y2, cls: nextClass, del: 1, touch: 2};
    setBox(i, before);
    commit([{kind: "box", i: i, before: before, after: Object.assign({}, before, {del: 0})}]);
    select(i);
  }
  function addArea(x1, y1, x2, y2) {
    const k = areas.length;
    const before = {x1: x1, y1: y1, x2: x2, y2: y2, del: 1};
    areas.push(Object.assign({layer: null}, before));
    commit([{kind: "area", i: k, before: before, after: Object.assign({}, before, {del: 0})}]);
  }
  function removeSelected() {
    if (selected >= 0) {
      commit([{kind: "box", i: selected, before: boxState(selected),
               after: Object.assign(boxState(selected), {del: 1})}]);
    } else if (chosenArea >= 0) {
      commit([{kind: "area", i: chosenArea, before: areaState(chosenArea),
               after: Object.assign(areaState(chosenArea), {del: 1})}]);
    }
  }
  function setClass(k) {
    if (k < 0 || k >= names.length) return;
    nextClass = k;
    document.getElementById("qd-class").value = String(k);
    if (selected >= 0 && B.cls[selected] !== k) {
      commit([{kind: "box", i: selected, before: boxState(selected), after: edited(selected, {cls: k})}]);
    }
  }

  // --- drawing -------------------------------------------------------------------------------
  function bounds(x1, y1, x2, y2) { return L.latLngBounds(V.toLatLng(x1, y2), V.toLatLng(x2, y1)); }
  function drawAreas() {
    areas.forEach((a, k) => {
      if (a.layer) { map.removeLayer(a.layer); a.layer = null; }
      if (a.del) return;
      a.layer = L.rectangle(bounds(a.x1, a.y1, a.x2, a.y2),
        Object.assign({}, AREA_STYLE, k === chosenArea ? {weight: 4} : {})).addTo(map);
    });
  }
  function drawSelection() {
    if (outline) { map.removeLayer(outline); outline = null; }
    if (selected < 0) return;
    const i = selected;
    outline = L.rectangle(bounds(B.x1[i], B.y1[i], B.x2[i], B.y2[i]),
      {color: "#ffffff", weight: 2, dashArray: "3 3", fill: false, interactive: false,
       pane: "qd-boxes"}).addTo(map);
    document.getElementById("qd-class").value = String(B.cls[i]);
  }
  function select(i) {
    selected = i; chosenArea = -1;
    drawSelection(); drawAreas();
    mapEl.dataset.selected = String(i);
  }

  // --- the mouse: draw, mark, move, resize (map dragging pans otherwise) -----------------------
  function pixelOf(e) { return V.toPixel(map.mouseEventToLatLng(e)); }
  function slack() { return 6 * Math.pow(2, DATA.sources[V.state.source].maxzoom - map.getZoom()); }
  function cornerAt(i, p) {
    const s = slack();
    for (const cx of ["x1", "x2"]) for (const cy of ["y1", "y2"]) {
      if (Math.abs(p[0] - B[cx][i]) <= s && Math.abs(p[1] - B[cy][i]) <= s) return [cx, cy];
    }
    return null;
  }
  function inside(i, p) { return p[0] >= B.x1[i] && p[0] <= B.x2[i] && p[1] >= B.y1[i] && p[1] <= B.y2[i]; }
  function rect(a, b) {
    return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  }
  function onDown(e) {
    swallowClick = false;
    if (e.button !== 0) return;
    const p = pixelOf(e);
    if (mode === "draw" || mode === "area") gesture = {kind: mode, start: p};
    else if (selected >= 0 && cornerAt(selected, p)) gesture = {kind: "resize", corner: cornerAt(selected, p), start: p, before: boxState(selected)};
    else if (selected >= 0 && inside(selected, p)) gesture = {kind: "move", start: p, before: boxState(selected)};
    if (!gesture) return;
    map.dragging.disable();
    e.preventDefault(); e.stopPropagation();
    document.addEventListener("pointermove", onMove, true);
    document.addEventListener("pointerup", onUp, true);
  }
  function onMove(e) {
    const p = pixelOf(e), g = gesture;
    if (g.kind === "draw" || g.kind === "area") {
      const r = rect(g.start, p);
      if (band) band.setBounds(bounds(r[0], r[1], r[2], r[3]));
      else band = L.rectangle(bounds(r[0], r[1], r[2], r[3]), g.kind === "area" ? AREA_STYLE :
        {color: DATA.groups[nextClass].color, weight: 2, fill: false, interactive: false}).addTo(map);
      return;
    }
    const i = selected, b = g.before, dx = p[0] - g.start[0], dy = p[1] - g.start[1];
    if (g.kind === "move") setBox(i, Object.assign({}, b, {x1: b.x1 + dx, x2: b.x2 + dx, y1: b.y1 + dy, y2: b.y2 + dy}));
    else { B[g.corner[0]][i] = b[g.corner[0]] + dx; B[g.corner[1]][i] = b[g.corner[1]] + dy; }
    drawSelection();
  }
  function onUp(e) {
    document.removeEventListener("pointermove", onMove, true);
    document.removeEventListener("pointerup", onUp, true);
    map.dragging.enable();
    const g = gesture, p = pixelOf(e);
    gesture = null; swallowClick = true;
    if (band) { map.removeLayer(band); band = null; }
    if (g.kind === "draw" || g.kind === "area") {
      const r = rect(g.start, p);
      if (r[2] - r[0] < 2 || r[3] - r[1] < 2) { swallowClick = false; return; }  // a click
      if (g.kind === "draw") addBox(r[0], r[1], r[2], r[3]); else addArea(r[0], r[1], r[2], r[3]);
      return;
    }
    const i = selected, r = rect([B.x1[i], B.y1[i]], [B.x2[i], B.y2[i]]);
    setBox(i, g.before);
    if (r[0] === g.before.x1 && r[1] === g.before.y1 && r[2] === g.before.x2 && r[3] === g.before.y2) {
      swallowClick = false; drawSelection(); return;
    }
    commit([{kind: "box", i: i, before: g.before, after: edited(i, {x1: r[0], y1: r[1], x2: r[2], y2: r[3]})}]);
  }
  function onClick(e) {
    if (swallowClick) { swallowClick = false; return; }
    if (mode !== "select") return;
    const p = V.toPixel(e.latlng), i = V.pick(p);
    if (i >= 0) { select(i); return; }
    chosenArea = areas.findIndex((a) => !a.del && p[0] >= a.x1 && p[0] <= a.x2 && p[1] >= a.y1 && p[1] <= a.y2);
    selected = -1; drawSelection(); drawAreas();
    mapEl.dataset.selected = "-1";
  }
  function setMode(m) {
    mode = m;
    map.getContainer().style.cursor = m === "select" ? "" : "crosshair";
    ["select", "draw", "area"].forEach((k) => {
      document.getElementById("qd-mode-" + k).classList.toggle("qd-on", k === m);
    });
    mapEl.dataset.mode = m;
  }

  // --- saving: to the server's file, or a download -------------------------------------------
  function inArea(i) {
    const cx = (B.x1[i] + B.x2[i]) / 2, cy = (B.y1[i] + B.y2[i]) / 2;
    return areas.some((a) => !a.del && cx >= a.x1 && cx <= a.x2 && cy >= a.y1 && cy <= a.y2);
  }
  function payload() {
    const boxes = [];
    for (let i = 0; i < B.score.length; i++) {
      if (B.source[i] !== E.source || B.del[i]) continue;
      const status = B.touch[i] === 2 ? "added" : B.touch[i] === 1 ? "edited" : inArea(i) ? "accepted" : "detected";
      if (status === "accepted" && !V.visible[i]) continue;  // hidden by the score or a class: not kept
      boxes.push({x1: B.x1[i], y1: B.y1[i], x2: B.x2[i], y2: B.y2[i], cls: names[B.cls[i]],
                  score: B.score[i], status: status});
    }
    return {boxes: boxes, areas: areas.filter((a) => !a.del).map((a) => [a.x1, a.y1, a.x2, a.y2])};
  }
  function said(text, ok) {
    const el = document.getElementById("qd-save-status");
    el.textContent = text; el.style.color = ok ? "#1a7f37" : "#c62828";
  }
  function save() {
    const p = payload();
    if (!E.token) return download(p);
    fetch("save", {method: "POST", body: JSON.stringify(p),
                   headers: {"Content-Type": "application/json", "X-QueryDet-Token": E.token}})
      .then((r) => r.json().then((j) => {
        if (!r.ok) throw new Error(j.error || r.statusText);
        dirty = false;
        said("saved " + j.labels + " labels, " + j.areas + " reviewed areas to " + j.path, true);
        mapEl.dataset.saved = String(j.labels);
      }))
      .catch((err) => { said("not saved: " + err.message, false); mapEl.dataset.saveError = err.message; });
  }
  function ring(x1, y1, x2, y2) {
    const t = E.transform;  // a, b, c, d, e, f: pixel -> map
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]].map((q) =>
      [t[0] * q[0] + t[1] * q[1] + t[2], t[3] * q[0] + t[4] * q[1] + t[5]]);
  }
  function document_(p) {
    if (E.transform) {
      const feature = (props, r) => ({type: "Feature", properties: props,
                                      geometry: {type: "Polygon", coordinates: [r]}});
      return {type: "FeatureCollection", crs: {type: "name", properties: {name: E.crs}},
        features: p.boxes.map((b) => feature({label: b.cls, score: b.score, status: b.status, role: "label"},
                                           ring(b.x1, b.y1, b.x2, b.y2)))
          .concat(p.areas.map((a) => feature({role: "reviewed_area"}, ring(a[0], a[1], a[2], a[3]))))};
    }
    const used = Array.from(new Set(p.boxes.map((b) => b.cls))).sort();
    return {images: [{id: 1, file_name: E.image, width: E.width, height: E.height,
                      reviewed_areas: p.areas.map((a) => [a[0], a[1], a[2] - a[0], a[3] - a[1]])}],
      annotations: p.boxes.map((b, k) => ({id: k + 1, image_id: 1, category_id: used.indexOf(b.cls) + 1,
        bbox: [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1], area: (b.x2 - b.x1) * (b.y2 - b.y1),
        iscrowd: 0, score: b.score, status: b.status})),
      categories: used.map((n, k) => ({id: k + 1, name: n}))};
  }
  function download(p) {
    const blob = new Blob([JSON.stringify(document_(p))], {type: "application/json"});
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = E.download;
    document.body.appendChild(a); a.click(); a.remove();
    dirty = false;
    said("downloaded " + E.download + ": " + p.boxes.length + " labels, " + p.areas.length + " reviewed areas", true);
    mapEl.dataset.saved = String(p.boxes.length);
  }

  // --- the panel and the keys ----------------------------------------------------------------
  function controls() {
    const pick = document.getElementById("qd-class");
    names.forEach((n, k) => {
      const o = document.createElement("option");
      o.value = String(k); o.textContent = (k < 9 ? (k + 1) + ": " : "") + n; pick.appendChild(o);
    });
    pick.addEventListener("change", () => setClass(parseInt(pick.value, 10)));
    const on = (id, fn) => document.getElementById(id).addEventListener("click", fn);
    on("qd-mode-select", () => setMode("select"));
    on("qd-mode-draw", () => setMode("draw"));
    on("qd-mode-area", () => setMode("area"));
    on("qd-delete", removeSelected);
    on("qd-undo", undo);
    on("qd-redo", redo);
    on("qd-save", save);
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
      const k = e.key.toLowerCase(), ctrl = e.ctrlKey || e.metaKey;
      if (ctrl && k === "z") { e.preventDefault(); if (e.shiftKey) redo(); else undo(); }
      else if (ctrl && k === "y") { e.preventDefault(); redo(); }
      else if (ctrl && k === "s") { e.preventDefault(); save(); }
      else if (ctrl) return;
      else if (k === "delete" || k === "backspace") { e.preventDefault(); removeSelected(); }
      else if (k === "b") setMode("draw");
      else if (k === "a") setMode("area");
      else if (k === "escape") { setMode("select"); select(-1); }
      else if (/^[1-9]$/.test(k)) setClass(parseInt(k, 10) - 1);
    });
    window.addEventListener("beforeunload", (e) => { if (dirty) { e.preventDefault(); e.returnValue = ""; } });
  }

  controls();
  (E.areas || []).forEach((a) => areas.push({x1: a[0], y1: a[1], x2: a[2], y2: a[3], del: 0, layer: null}));
  map.getContainer().addEventListener("pointerdown", onDown, true);
  map.on("click", onClick);
  setMode("select");
  changed();
  dirty = false;
  mapEl.dataset.editor = "ready";
})();
