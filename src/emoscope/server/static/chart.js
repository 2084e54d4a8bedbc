// The line chart of the monitored emotions' z-scores over the conversation's tokens (uPlot).

/* global uPlot */

export class EmotionChart {
  /**
   * @param {HTMLElement} el  the chart's container
   * @param {(index: number | null) => void} onCursor  the token under the cursor, or null
   */
  constructor(el, onCursor) {
    this.el = el;
    this.onCursor = onCursor;
    this.plot = null;
    this.emotions = [];
    this.pending = null;
    new ResizeObserver(() => this.resize()).observe(el);
  }

  size() {
    const legend = this.plot ? this.plot.root.querySelector(".u-legend") : null;
    const below = legend ? legend.offsetHeight : 28;
    return {
      width: Math.max(200, this.el.clientWidth),
      height: Math.max(120, this.el.clientHeight - below - 4),
    };
  }

  resize() {
    if (this.plot) this.plot.setSize(this.size());
  }

  /** Start over with these emotions (and their colours) as the series. */
  setEmotions(emotions, colours) {
    this.emotions = emotions;
    if (this.plot) this.plot.destroy();
    const value = (u, v) => (v == null ? "–" : `${v >= 0 ? "+" : ""}${v.toFixed(2)}`);
    const options = {
      ...this.size(),
      scales: { x: { time: false } },
      axes: [
        { label: "token", size: 36, labelSize: 16 },
        { label: "z (σ)", size: 44, labelSize: 16 },
      ],
      series: [
        { label: "token", value: (u, v) => (v == null ? "–" : String(v)) },
        ...emotions.map((name, i) => ({
          label: name,
          stroke: colours[i],
          width: 1.5,
          value,
          points: { show: false },
        })),
      ],
      cursor: { drag: { x: true, y: false }, points: { size: 6 } },
      hooks: {
        setCursor: [(u) => this.onCursor(u.cursor.idx ?? null)],
      },
    };
    this.plot = new uPlot(options, [[], ...emotions.map(() => [])], this.el);
    // the legend's height is known once uPlot has laid the chart out
    requestAnimationFrame(() => this.resize());
  }

  /** Put the cursor on token n, as if the mouse were over it. */
  point(n) {
    if (!this.plot || n == null || n >= this.plot.data[0].length) return;
    const left = this.plot.valToPos(n, "x");
    if (!(left >= 0 && left <= this.plot.bbox.width / uPlot.pxRatio)) return;
    const z = this.plot.data.slice(1).map((ys) => ys[n]).find((v) => v != null);
    const top = z == null ? this.plot.bbox.height / uPlot.pxRatio / 2 : this.plot.valToPos(z, "y");
    this.plot.setCursor({ left, top });
  }

  /** Show these tokens: each has `scores` ({emotion: z}) and possibly `top` ([[name, z]]). */
  setTokens(tokens) {
    this.pending = tokens;
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      const list = this.pending;
      const xs = list.map((_, i) => i);
      const ys = this.emotions.map((name) => list.map((t) => score(t, name)));
      this.plot.setData([xs, ...ys]);
      this.el.dataset.tokens = String(list.length);
    });
  }
}

/** A token's z-score for an emotion, from its scores or else its top list; null if absent. */
export function score(token, name) {
  const z = token.scores ? token.scores[name] : undefined;
  if (typeof z === "number" && Number.isFinite(z)) return z;
  for (const [other, value] of token.top || []) {
    if (other === name && typeof value === "number" && Number.isFinite(value)) return value;
  }
  return null;
}
