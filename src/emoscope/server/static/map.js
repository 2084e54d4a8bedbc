// The emotion map: every emotion at its 2-D PCA coordinates (from /v1/emotions), drawn as SVG,
// with the conversation's current position and its recent trail.
//
// The current position is the mean of the map coordinates of the emotions the last WINDOW
// tokens report (each token's top-k emotions, or its monitored scores when it has no top list),
// weighted by their positive z-scores: a short window keeps the mark from jumping with every
// token. While no reported emotion in the window is above zero, the mark stays where it was.

import { score } from "./chart.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 420;
const PAD = 24;
const TRAIL = 30;
const WINDOW = 5;
const CLUSTER_COLOURS = [
  "#2f7d32", "#1f77b4", "#17becf", "#bcbd22", "#8c564b",
  "#9467bd", "#e377c2", "#ff7f0e", "#d62728", "#7f7f7f",
];

function node(name, attributes = {}, parent = null) {
  const el = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
  if (parent) parent.append(el);
  return el;
}

function signed(z) {
  return `${z >= 0 ? "+" : "−"}${Math.abs(z).toFixed(2)}`;
}

export class EmotionMap {
  constructor(svg, hint) {
    this.svg = svg;
    this.hint = hint;
    this.coords = new Map();
    this.monitored = [];
    this.trail = [];
    this.recent = [];
    svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    this.dots = node("g", { class: "dots" }, svg);
    this.path = node("polyline", { class: "trail" }, svg);
    this.steps = node("g", { class: "steps" }, svg);
    this.labels = node("g", { class: "labels" }, svg);
    this.now = node("circle", { id: "map-now", class: "now", r: 7, visibility: "hidden" }, svg);
  }

  /** rows: [{name, x, y, valence, arousal, cluster}] */
  setEmotions(rows) {
    const placed = rows.filter((r) => Number.isFinite(r.x) && Number.isFinite(r.y));
    this.coords.clear();
    this.dots.replaceChildren();
    if (!placed.length) {
      this.hint.textContent = "no map coordinates";
      return;
    }
    const xs = placed.map((r) => r.x);
    const ys = placed.map((r) => r.y);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    // one scale for both axes, so distances on the map keep their proportions
    const scale = Math.min((WIDTH - 2 * PAD) / (x1 - x0 || 1), (HEIGHT - 2 * PAD) / (y1 - y0 || 1));
    const cx = (WIDTH - (x1 - x0) * scale) / 2;
    const cy = (HEIGHT - (y1 - y0) * scale) / 2;
    this.project = ([x, y]) => [cx + (x - x0) * scale, HEIGHT - (cy + (y - y0) * scale)];

    const byCluster = placed.some((r) => r.cluster != null);
    for (const row of placed) {
      this.coords.set(row.name, [row.x, row.y]);
      const [px, py] = this.project([row.x, row.y]);
      const dot = node("circle", { class: "dot", cx: px, cy: py, r: 3.5 }, this.dots);
      dot.dataset.name = row.name;
      dot.setAttribute("fill", byCluster ? clusterColour(row.cluster) : valenceColour(row.valence));
      const parts = [row.name];
      if (row.valence != null) parts.push(`valence ${row.valence.toFixed(2)}`);
      if (row.arousal != null) parts.push(`arousal ${row.arousal.toFixed(2)}`);
      if (row.cluster != null) parts.push(`cluster ${row.cluster}`);
      node("title", {}, dot).textContent = parts.join(" · ");
    }
    const colouring = byCluster ? "cluster" : "human valence";
    this.hint.textContent = `${placed.length} emotions · x: PC1, y: PC2 · colour: ${colouring} · ● now`;
    this.hint.title =
      `● is the z-weighted mean position of the emotions read over the last ${WINDOW} tokens; ` +
      `the line joins its last ${TRAIL} positions.`;
    this.draw(null);
  }

  setMonitored(names) {
    this.monitored = names;
    this.draw(this.current || null);
  }

  /** A token's weighted sums: [Σ z·x, Σ z·y, Σ z] over its reported emotions with z > 0. */
  weights(token) {
    const reported = token.top && token.top.length
      ? token.top.map(([name]) => name)
      : Object.keys(token.scores || {});
    const sums = [0, 0, 0];
    for (const name of reported) {
      const at = this.coords.get(name);
      const z = score(token, name);
      if (!at || z == null || z <= 0) continue;
      sums[0] += z * at[0];
      sums[1] += z * at[1];
      sums[2] += z;
    }
    return sums;
  }

  /** Move along the conversation by these tokens, just read (null: start over). */
  advance(tokens) {
    if (!tokens) {
      this.trail = [];
      this.recent = [];
      this.current = null;
    } else {
      for (const token of tokens) {
        this.recent = [...this.recent, this.weights(token)].slice(-WINDOW);
        const [sx, sy, total] = this.recent.reduce((a, b) => [a[0] + b[0], a[1] + b[1], a[2] + b[2]]);
        if (total > 0) this.trail.push([sx / total, sy / total]);
        this.current = token;
      }
      this.trail = this.trail.slice(-TRAIL);
    }
    this.draw(this.current);
  }

  draw(token) {
    if (!this.project) return;
    const points = this.trail.map((p) => this.project(p));
    this.path.setAttribute("points", points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
    this.steps.replaceChildren(
      ...points.map(([x, y], i) =>
        node("circle", { cx: x, cy: y, r: 2.2, "fill-opacity": ((i + 1) / points.length).toFixed(2) }),
      ),
    );
    const last = points[points.length - 1];
    if (last) {
      this.now.setAttribute("cx", last[0]);
      this.now.setAttribute("cy", last[1]);
      this.now.setAttribute("visibility", "visible");
    } else {
      this.now.setAttribute("visibility", "hidden");
    }
    this.now.replaceChildren();
    if (last && token) node("title", {}, this.now).textContent = `now: token ${token.n} “${token.text}”`;

    // labels: the monitored emotions, and the current token's three strongest
    const strongest = (token && token.top ? token.top : []).slice(0, 3).map(([name, z]) => [name, z]);
    const named = new Map(this.monitored.map((name) => [name, null]));
    for (const [name, z] of strongest) named.set(name, z);
    this.labels.replaceChildren();
    for (const [name, z] of named) {
      const at = this.coords.get(name);
      if (!at) continue;
      const [x, y] = this.project(at);
      const label = node("text", { x: x + 6, y: y - 5, class: z == null ? "label" : "label strong" }, this.labels);
      label.textContent = z == null ? name : `${name} ${signed(z)}`;
    }
    for (const dot of this.dots.children) {
      dot.classList.toggle("watched", named.has(dot.dataset.name));
    }
  }
}

function clusterColour(cluster) {
  if (cluster == null) return "#9aa0a6";
  let n = Number(cluster);
  if (!Number.isInteger(n)) n = [...String(cluster)].reduce((h, c) => h * 31 + c.charCodeAt(0), 0);
  const k = CLUSTER_COLOURS.length;
  return CLUSTER_COLOURS[(((n - 1) % k) + k) % k];
}

function valenceColour(valence) {
  if (valence == null) return "#9aa0a6";
  // Warriner valence runs 1..9: red for unpleasant, through amber, to green for pleasant
  const t = Math.min(1, Math.max(0, (valence - 1) / 8));
  return `hsl(${Math.round(t * 130)}, 55%, 45%)`;
}
