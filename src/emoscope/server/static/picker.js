// A searchable emotion picker: a search field with a filtered list below it. Names that start
// with the query come first, then names that contain it; arrows move, Enter picks, Escape closes.

const SHOWN = 12;

export function normalise(text) {
  return text.trim().toLowerCase().replace(/_/g, " ").replace(/\s+/g, " ");
}

export function matches(names, query) {
  const q = normalise(query);
  if (!q) return names.slice(0, SHOWN);
  const starts = names.filter((n) => n.startsWith(q));
  const inside = names.filter((n) => !n.startsWith(q) && n.includes(q));
  return [...starts, ...inside].slice(0, SHOWN);
}

let counter = 0;

export class Picker {
  /**
   * @param {HTMLElement} root  a `.picker` element holding one input
   * @param {() => string[]} names  the names to choose from (read on every search)
   * @param {(name: string) => void} onPick
   * @param {{keep?: boolean}} options  keep: leave the picked name in the field
   */
  constructor(root, names, onPick, { keep = false } = {}) {
    this.input = root.querySelector("input");
    this.names = names;
    this.onPick = onPick;
    this.keep = keep;
    this.list = document.createElement("ul");
    this.list.className = "picker-list";
    this.list.id = `picker-list-${++counter}`;
    this.list.setAttribute("role", "listbox");
    this.list.hidden = true;
    root.append(this.list);
    this.input.setAttribute("role", "combobox");
    this.input.setAttribute("aria-controls", this.list.id);
    this.input.setAttribute("aria-expanded", "false");
    this.active = -1;
    this.shown = [];

    this.input.addEventListener("input", () => this.open());
    this.input.addEventListener("focus", () => this.open());
    this.input.addEventListener("blur", () => this.close());
    this.input.addEventListener("keydown", (event) => this.key(event));
    // mousedown, not click: it lands before the field's blur closes the list
    this.list.addEventListener("mousedown", (event) => {
      const item = event.target.closest("li");
      if (!item) return;
      event.preventDefault();
      this.pick(item.dataset.name);
    });
  }

  get value() {
    return normalise(this.input.value);
  }

  set value(name) {
    this.input.value = name;
  }

  open() {
    this.shown = matches(this.names(), this.input.value);
    this.active = this.shown.length ? 0 : -1;
    this.render();
  }

  close() {
    this.list.hidden = true;
    this.input.setAttribute("aria-expanded", "false");
  }

  render() {
    this.list.replaceChildren(
      ...this.shown.map((name, i) => {
        const item = document.createElement("li");
        item.textContent = name;
        item.dataset.name = name;
        item.setAttribute("role", "option");
        item.setAttribute("aria-selected", String(i === this.active));
        if (i === this.active) item.classList.add("active");
        return item;
      }),
    );
    const empty = !this.shown.length;
    this.list.hidden = empty;
    this.input.setAttribute("aria-expanded", String(!empty));
  }

  key(event) {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      if (this.list.hidden) this.open();
      if (!this.shown.length) return;
      const step = event.key === "ArrowDown" ? 1 : -1;
      this.active = (this.active + step + this.shown.length) % this.shown.length;
      this.render();
      event.preventDefault();
    } else if (event.key === "Enter") {
      event.preventDefault();
      const exact = this.names().find((n) => n === this.value);
      const name = exact || (this.list.hidden ? null : this.shown[this.active]);
      if (name) this.pick(name);
    } else if (event.key === "Escape") {
      this.close();
    }
  }

  pick(name) {
    this.input.value = this.keep ? name : "";
    this.close();
    this.onPick(name);
  }
}
