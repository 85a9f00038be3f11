// querydet view: detections over their imagery, in raster pixels (Leaflet's CRS.Simple).
// The page holds one JSON object (#querydet-data): groups (colour, name), sources (size, tile
// pyramid depth, an embedded image or a tile URL) and the boxes as columns. Boxes are drawn on
// canvas tiles (L.GridLayer) from a bucket index, so 100 000 boxes pan and filter at once.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("querydet-data").textContent);
  const B = DATA.boxes;  // columns: x1 y1 x2 y2 score group cls source (+ del touch: editing)
  const mapEl = document.getElementById("map");
  const CELL = 256;  // bucket side in source pixels
  const state = {source: 0, minScore: DATA.minScore, on: DATA.groups.map(() => true),
                 order: [], cursor: -1};
  const visible = [];  // grows with the boxes an editor draws
  let buckets = new Map(), maxSide = 1, map = null, imageLayer = null, boxLayer = null;
  const t0 = performance.now();

  function src() { return DATA.sources[state.source]; }
  function unit() { return Math.pow(2, src().maxzoom); }  // source pixels per map unit
  function toLatLng(x, y) { const s = unit(); return L.latLng(-y / s, x / s); }
  function toPixel(ll) { const s = unit(); return [ll.lng * s, -ll.lat * s]; }
  function passes(i) {
    if (B.del && B.del[i]) return false;  // deleted while editing
    return B.source[i] === state.source && state.on[B.group[i]] &&
      (B.score[i] < 0 || B.score[i] >= state.minScore ||  // a miss (score -1) always passes
       (B.touch && B.touch[i] > 0));  // so does a box a person edited or drew
  }

  function index() {  // buckets of this source's boxes by centre cell
    buckets = new Map(); maxSide = 1;
    for (let i = 0; i < B.score.length; i++) {
      if (B.source[i] !== state.source) continue;
      const key = Math.floor((B.x1[i] + B.x2[i]) / 2 / CELL) + "," +
        Math.floor((B.y1[i] + B.y2[i]) / 2 / CELL);
      if (!buckets.has(key)) buckets.set(key, []);
      buckets.get(key).push(i);
      maxSide = Math.max(maxSide, B.x2[i] - B.x1[i], B.y2[i] - B.y1[i]);
    }
  }

  function near(x1, y1, x2, y2, visit) {  // boxes whose centre cell may touch the rectangle
    const pad = maxSide / 2;
    const cx1 = Math.floor((x1 - pad) / CELL), cx2 = Math.floor((x2 + pad) / CELL);
    const cy1 = Math.floor((y1 - pad) / CELL), cy2 = Math.floor((y2 + pad) / CELL);
    if ((cx2 - cx1 + 1) * (cy2 - cy1 + 1) > buckets.size) {
      buckets.forEach((list) => list.forEach(visit));
      return;
    }
    for (let cy = cy1; cy <= cy2; cy++)
      for (let cx = cx1; cx <= cx2; cx++) {
        const list = buckets.get(cx + "," + cy);
        if (list) list.forEach(visit);
      }
  }

  function filter() {
    const counts = DATA.groups.map(() => 0);
    let shown = 0;
    state.order = [];
    for (let i = 0; i < B.score.length; i++) {
      visible[i] = passes(i) ? 1 : 0;
      if (visible[i]) { counts[B.group[i]]++; shown++; state.order.push(i); }
    }
    state.order.sort((a, b) => B.score[b] - B.score[a]);
    state.cursor = -1;
    DATA.groups.forEach((g, k) => {
      document.getElementById("count-" + k).textContent = counts[k].toLocaleString("en");
    });
    document.getElementById("shown").textContent = shown.toLocaleString("en");
    mapEl.dataset.features = String(shown);
    if (boxLayer) boxLayer.redraw();
  }

  const BoxLayer = L.GridLayer.extend({
    createTile: function (coords) {
      const tile = L.DomUtil.create("canvas", "qd-tile");
      const size = this.getTileSize();
      tile.width = size.x; tile.height = size.y;
      const r = Math.pow(2, src().maxzoom - coords.z);  // source pixels per screen pixel
      const ox = coords.x * size.x * r, oy = coords.y * size.y * r;
      const ctx = tile.getContext("2d");
      ctx.lineWidth = 2;
      near(ox, oy, ox + size.x * r, oy + size.y * r, (i) => {
        if (!visible[i]) return;
        const x = (B.x1[i] - ox) / r, y = (B.y1[i] - oy) / r;
        const w = Math.max(1, (B.x2[i] - B.x1[i]) / r), h = Math.max(1, (B.y2[i] - B.y1[i]) / r);
        if (x > size.x || y > size.y || x + w < 0 || y + h < 0) return;
        ctx.strokeStyle = DATA.groups[B.group[i]].color;
        if (w < 4 || h < 4) { ctx.fillStyle = ctx.strokeStyle; ctx.fillRect(x, y, w, h); }
        else ctx.strokeRect(x, y, w, h);
      });
      return tile;
    }
  });

  function describe(i) {
    const s = DATA.sources[B.source[i]];
    const rows = [["class", DATA.classNames[B.cls[i]]], ["group", DATA.groups[B.group[i]].name],
      ["score", B.score[i] < 0 ? "(ground truth)" : B.score[i].toFixed(4)],
      ["pixel box", [B.x1[i], B.y1[i], B.x2[i], B.y2[i]].map((v) => v.toFixed(1)).join(", ")],
      ["source", s.name]];
    return "<table class='qd-props'>" + rows.map((r) =>
      "<tr><th>" + r[0] + "</th><td>" + String(r[1]).replace(/</g, "&lt;") + "</td></tr>")
      .join("") + "</table>";
  }

  function open(i) {
    const c = toLatLng((B.x1[i] + B.x2[i]) / 2, (B.y1[i] + B.y2[i]) / 2);
    L.popup().setLatLng(c).setContent(describe(i)).openOn(map);
    mapEl.dataset.selected = String(i);
  }

  function zoomTo(i) {
    const pad = Math.max(B.x2[i] - B.x1[i], B.y2[i] - B.y1[i]) * 3;
    map.fitBounds(L.latLngBounds(toLatLng(B.x1[i] - pad, B.y2[i] + pad),
                                 toLatLng(B.x2[i] + pad, B.y1[i] - pad)), {animate: false});
    open(i);
  }

  function pick(p) {  // the smallest shown box under a source pixel, or -1
    const slack = 3 * Math.pow(2, src().maxzoom - map.getZoom());  // a few screen pixels
    let best = -1, area = Infinity;
    near(p[0], p[1], p[0], p[1], (i) => {
      if (!visible[i]) return;
      if (p[0] < B.x1[i] - slack || p[0] > B.x2[i] + slack ||
          p[1] < B.y1[i] - slack || p[1] > B.y2[i] + slack) return;
      const a = (B.x2[i] - B.x1[i]) * (B.y2[i] - B.y1[i]);
      if (a < area) { area = a; best = i; }
    });
    return best;
  }

  function clicked(e) {
    if (DATA.edit) return;  // the editor's clicks select (editor.js)
    const best = pick(toPixel(e.latlng));
    if (best >= 0) open(best);
  }

  function showSource(k) {
    state.source = k;
    const s = src();
    if (imageLayer) map.removeLayer(imageLayer);
    const bounds = L.latLngBounds(toLatLng(0, s.height), toLatLng(s.width, 0));
    if (s.tiles) {
      imageLayer = L.tileLayer(s.tiles, {bounds: bounds, maxNativeZoom: s.maxzoom, minZoom: -4,
        maxZoom: s.maxzoom + 4, noWrap: true});
    } else if (s.image) {
      imageLayer = L.imageOverlay(s.image, bounds);
    } else {
      imageLayer = L.rectangle(bounds, {color: "#999", weight: 1, fill: false, interactive: false});
    }
    imageLayer.addTo(map);
    index();
    filter();
    map.fitBounds(bounds, {animate: false});
    mapEl.dataset.source = String(k);
  }

  function controls() {
    const legend = document.getElementById("legend");
    DATA.groups.forEach((g, k) => {
      const row = document.createElement("label");
      row.className = "qd-group";
      row.innerHTML = "<input type='checkbox' checked id='group-" + k + "'> <span class='qd-swatch'" +
        " style='border-color:" + g.color + "'></span> " + g.name.replace(/</g, "&lt;") +
        " <span class='qd-count' id='count-" + k + "'></span>";
      legend.appendChild(row);
      row.querySelector("input").addEventListener("change", (e) => {
        state.on[k] = e.target.checked; filter();
      });
    });
    const slider = document.getElementById("score");
    slider.value = String(state.minScore);
    const label = document.getElementById("score-value");
    label.textContent = state.minScore.toFixed(2);
    slider.addEventListener("input", () => {
      state.minScore = parseFloat(slider.value);
      label.textContent = state.minScore.toFixed(2);
      filter();
    });
    const pick = document.getElementById("source");
    DATA.sources.forEach((s, k) => {
      const o = document.createElement("option");
      o.value = String(k); o.textContent = s.name; pick.appendChild(o);
    });
    pick.parentElement.style.display = DATA.sources.length > 1 ? "" : "none";
    pick.addEventListener("change", () => showSource(parseInt(pick.value, 10)));
    document.getElementById("top").addEventListener("click", () => {
      if (state.order.length) { state.cursor = 0; zoomTo(state.order[0]); }
    });
    document.getElementById("next").addEventListener("click", () => {
      if (!state.order.length) return;
      state.cursor = (state.cursor + 1) % state.order.length;
      zoomTo(state.order[state.cursor]);
    });
  }

  map = L.map("map", {crs: L.CRS.Simple, minZoom: -6, maxZoom: 12, zoomSnap: 0.25,
                      attributionControl: false, preferCanvas: true});
  controls();
  const pane = map.createPane("qd-boxes");  // above the imagery (tiles or one picture)
  pane.style.zIndex = 450;
  pane.style.pointerEvents = "none";
  boxLayer = new BoxLayer({pane: "qd-boxes", minZoom: -6, maxZoom: 12}).addTo(map);
  map.on("click", clicked);
  boxLayer.once("load", () => {
    mapEl.dataset.renderMs = String(Math.round(performance.now() - t0));
    mapEl.dataset.ready = "true";
  });
  showSource(0);
  // what the editor (editor.js, in `view --edit` pages only) works with
  window.querydetView = {DATA: DATA, B: B, map: map, mapEl: mapEl, state: state, visible: visible,
    toLatLng: toLatLng, toPixel: toPixel, pick: pick, unit: unit,
    refresh: function () { index(); filter(); }};
})();
