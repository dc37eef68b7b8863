// Diffusion SAE frontend extension. ComfyUI serves WEB_DIRECTORY (./web) at /extensions/diffusion_sae/,
// so this file is /extensions/diffusion_sae/js/diffusion_sae.js and the app module is three levels up.
//
// It adds a "SAE features" sidebar tab (browse a dictionary's feature index: thumbnails with heatmaps,
// labels, search, sort, a detail view, and "use in Steer"), and a preview on every Steer node showing
// the label and thumbnail of each feature it steers. Data comes from the plugin's routes (nodes/routes.py).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const ROUTES = "/diffusion_sae";
const PAGE = 48;
const STEER = "SAESteer";
const LOADER = "SAELoadDictionary";

const STYLE = `
.dsae { display: flex; flex-direction: column; gap: 8px; padding: 8px; height: 100%; box-sizing: border-box;
        font-size: 13px; color: var(--fg-color, #ddd); }
.dsae-bar { display: flex; gap: 6px; flex-wrap: wrap; }
.dsae-bar select, .dsae-bar input { background: var(--comfy-input-bg, #222); color: inherit;
        border: 1px solid var(--border-color, #444); border-radius: 4px; padding: 3px 6px; }
.dsae-bar input { flex: 1; min-width: 80px; }
.dsae-status { color: #aaa; font-size: 12px; min-height: 16px; }
.dsae-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: 6px;
        overflow-y: auto; flex: 1; align-content: start; }
.dsae-card { border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 4px; cursor: pointer;
        background: var(--comfy-menu-bg, #1b1b1b); }
.dsae-card:hover { border-color: #8ab4f8; }
.dsae-card img, .dsae-detail img { width: 100%; image-rendering: pixelated; border-radius: 4px; display: block; }
.dsae-card .dsae-name { font-weight: 600; margin-top: 3px; white-space: nowrap; overflow: hidden;
        text-overflow: ellipsis; }
.dsae-card .dsae-meta { color: #999; font-size: 11px; }
.dsae-detail { overflow-y: auto; flex: 1; display: none; }
.dsae-detail h3 { margin: 4px 0; }
.dsae-tops { display: grid; grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); gap: 4px; }
.dsae-tops figure { margin: 0; font-size: 10px; color: #999; }
.dsae-detail .dsae-chart { width: 100%; image-rendering: auto; background: white; margin-top: 6px; }
.dsae button { background: var(--comfy-input-bg, #333); color: inherit; border: 1px solid #666;
        border-radius: 4px; padding: 3px 10px; cursor: pointer; }
.dsae button.dsae-use { background: #2d5fa8; border-color: #2d5fa8; color: white; }
.dsae-steer { display: flex; gap: 4px; flex-wrap: wrap; font-size: 11px; color: #ccc; }
.dsae-steer figure { margin: 0; width: 64px; }
.dsae-steer img { width: 64px; height: 64px; image-rendering: pixelated; border-radius: 3px; }
.dsae-steer figcaption { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
`;

async function getJson(path, params) {
  const query = new URLSearchParams(params).toString();
  const response = await api.fetchApi(`${ROUTES}/${path}${query ? "?" + query : ""}`);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function url(path, params) {
  return api.apiURL(`${ROUTES}/${path}?${new URLSearchParams(params).toString()}`);
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// A page row's words are plain; a full record's are [word, score] pairs.
function featureName(row) {
  const words = (row.words || []).map((w) => (Array.isArray(w) ? w[0] : w));
  return row.label || (words.length ? words.slice(0, 3).join(" ") : "(no words)");
}

// --- which Steer node a click goes to, and what its dictionary is --------------------------------

function steerNodes() {
  return (app.graph?._nodes || []).filter((n) => n.type === STEER);
}

function targetSteerNode() {
  const selected = Object.values(app.canvas?.selected_nodes || {}).filter((n) => n.type === STEER);
  if (selected.length) return selected[0];
  const all = steerNodes();
  return all.length === 1 ? all[0] : null;
}

function dictionaryOf(node) {
  const input = node.inputs?.find((i) => i.name === "dictionary");
  const link = input?.link != null ? app.graph.links[input.link] : null;
  const source = link ? app.graph.getNodeById(link.origin_id) : null;
  if (!source || source.type !== LOADER) return null;
  const value = source.widgets?.find((w) => w.name === "dictionary")?.value;
  return value && value !== "(none)" ? value : null;
}

function featureIds(text) {
  return String(text || "").split(/[\s,]+/).filter(Boolean).map(Number).filter(Number.isInteger);
}

export function useFeature(id, dictionary) {
  const node = targetSteerNode();
  if (!node) {
    return steerNodes().length
      ? "select the Steer node to use this feature in (several are in the workflow)"
      : "add a Steer node to the workflow first";
  }
  const widget = node.widgets.find((w) => w.name === "features");
  const ids = featureIds(widget.value);
  if (!ids.includes(id)) ids.push(id);
  const replaces = widget.value === "0" && node.__dsaeUsed !== true;  // the default, never chosen by a user
  widget.value = (replaces ? [id] : ids).join(", ");
  widget.callback?.(widget.value);
  node.__dsaeUsed = true;
  node.__dsaeDictionary = dictionary;
  refreshSteerPreview(node);
  app.graph.setDirtyCanvas(true, true);
  return `feature ${id} is now in Steer node #${node.id}: ${widget.value}`;
}

// --- the preview on Steer nodes ------------------------------------------------------------------

async function refreshSteerPreview(node) {
  const box = node.__dsaeBox;
  if (!box) return;
  const dictionary = dictionaryOf(node) || node.__dsaeDictionary;
  const ids = featureIds(node.widgets.find((w) => w.name === "features")?.value).slice(0, 8);
  box.replaceChildren();
  if (!dictionary || !ids.length) return;
  for (const id of ids) {
    const figure = element("figure", { "data-feature": String(id) });
    const caption = element("figcaption", { text: `#${id}` });
    figure.append(element("img", { src: url("tile", { dictionary, id, rank: 0 }), alt: `feature ${id}` }), caption);
    box.append(figure);
    getJson("feature", { dictionary, id })
      .then((record) => { caption.textContent = `#${id} ${featureName(record)}`; })
      .catch(() => { figure.querySelector("img")?.remove(); caption.textContent = `#${id} (no index)`; });
  }
}

function addSteerPreview(node) {
  const box = element("div", { class: "dsae dsae-steer" });
  node.__dsaeBox = box;
  const preview = node.addDOMWidget("feature_preview", "diffusion_sae_preview", box, { serialize: false, hideOnZoom: false });
  preview.serialize = false;  // a view, not a value: neither the workflow nor the prompt carries it
  const widget = node.widgets.find((w) => w.name === "features");
  const previous = widget?.callback;
  if (widget) {
    widget.callback = function (value, ...rest) {
      const result = previous?.apply(this, [value, ...rest]);
      refreshSteerPreview(node);
      return result;
    };
  }
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const result = onConnectionsChange?.apply(this, args);
    refreshSteerPreview(node);
    return result;
  };
  setTimeout(() => refreshSteerPreview(node), 0);
}

// --- text results on the node ---------------------------------------------------------------------

// The bundled frontend draws a node's returned text only on its own Preview Any node; our nodes' summaries
// (a dictionary's description, a training or index summary, top features) are shown on the node itself.
function showText(node, lines) {
  if (!node.__dsaeText) {
    const box = element("pre", { class: "dsae-text" });
    box.style.cssText = "white-space: pre-wrap; font-size: 11px; margin: 0; padding: 4px; max-height: 160px;" +
                        "overflow-y: auto; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);";
    const widget = node.addDOMWidget("summary", "diffusion_sae_text", box, { serialize: false });
    widget.serialize = false;
    node.__dsaeText = box;
  }
  node.__dsaeText.textContent = lines.join("\n");
  app.graph.setDirtyCanvas(true, true);
}

function addTextDisplay(node) {
  const onExecuted = node.onExecuted;
  node.onExecuted = function (message) {
    const result = onExecuted?.apply(this, arguments);
    const text = message?.text;
    if (text && text.length) showText(node, Array.isArray(text) ? text.map(String) : [String(text)]);
    return result;
  };
}

// --- the sidebar browser -------------------------------------------------------------------------

function renderBrowser(root) {
  root.replaceChildren();
  root.append(element("style", { text: STYLE }));
  const select = element("select", { class: "dsae-dictionary", title: "dictionary (models/sae)" });
  const search = element("input", { class: "dsae-search", type: "search", placeholder: "search labels and words" });
  const sort = element("select", { class: "dsae-sort", title: "sort features by" });
  for (const [value, text] of [["frequency", "most frequent"], ["score", "best word score"], ["images", "most images"],
                               ["mean", "strongest"], ["id", "id"]]) {
    sort.append(element("option", { value, text }));
  }
  const status = element("div", { class: "dsae-status" });
  const grid = element("div", { class: "dsae-grid" });
  const more = element("button", { class: "dsae-more", text: "more" });
  const detail = element("div", { class: "dsae-detail" });
  const panel = element("div", { class: "dsae" }, element("div", { class: "dsae-bar" }, select, sort, search),
                        status, grid, more, detail);
  root.append(panel);
  let offset = 0;
  let total = 0;
  let generation = 0;

  async function loadDictionaries() {
    try {
      const { dictionaries } = await getJson("dictionaries", {});
      select.replaceChildren(...dictionaries.map((d) => element("option", {
        value: d.name, text: `${d.name}${d.indexed ? "" : " (no index)"}` })));
      const first = dictionaries.find((d) => d.indexed) || dictionaries[0];
      if (!first) {
        status.textContent = "no dictionaries in models/sae: train one (Train Dictionary) or put one there";
        return;
      }
      select.value = first.name;
      await reload();
    } catch (error) {
      status.textContent = String(error.message || error);
    }
  }

  async function reload() {
    offset = 0;
    grid.replaceChildren();
    detail.style.display = "none";
    grid.style.display = "";
    await loadPage();
  }

  async function loadPage() {
    const mine = ++generation;
    const params = { dictionary: select.value, offset, limit: PAGE, sort: sort.value };
    if (search.value.trim()) params.q = search.value.trim();
    try {
      const page = await getJson("features", params);
      if (mine !== generation) return;
      total = page.total;
      for (const row of page.features) grid.append(card(row));
      offset += page.features.length;
      status.textContent = `${total} feature${total === 1 ? "" : "s"}${params.q ? ` matching "${params.q}"` : ""}`;
      more.style.display = offset < total ? "" : "none";
    } catch (error) {
      if (mine !== generation) return;
      status.textContent = String(error.message || error);
      more.style.display = "none";
    }
  }

  function card(row) {
    const dictionary = select.value;
    const name = featureName(row);
    return element("div", { class: "dsae-card", "data-feature": String(row.id), title: name, onclick: () => open(row.id) },
      row.thumbnail ? element("img", { src: url("tile", { dictionary, id: row.id, rank: 0 }), alt: name, loading: "lazy" })
                    : element("div", { class: "dsae-meta", text: "never fired" }),
      element("div", { class: "dsae-name", text: `#${row.id} ${name}` }),
      element("div", { class: "dsae-meta", text: `${(100 * row.frequency).toFixed(2)}% of tokens · ${row.images} img` }));
  }

  async function open(id) {
    const dictionary = select.value;
    const record = await getJson("feature", { dictionary, id });
    const words = record.words.map(([w, s]) => `${w} (${s.toFixed(2)})`).join(", ") || "none";
    const tops = element("div", { class: "dsae-tops" }, ...record.top.map((entry, rank) => element("figure", {},
      element("img", { src: url("tile", { dictionary, id, rank }), alt: entry.prompt }),
      element("figcaption", { text: `${entry.prompt} · ${entry.peak.toFixed(2)}` }))));
    const note = element("div", { class: "dsae-status dsae-use-status" });
    detail.replaceChildren(
      element("button", { class: "dsae-back", text: "← all features", onclick: () => {
        detail.style.display = "none"; grid.style.display = ""; more.style.display = offset < total ? "" : "none"; } }),
      element("h3", { text: `#${id} ${featureName(record)}` }),
      element("button", { class: "dsae-use", text: "use in Steer", onclick: () => { note.textContent = useFeature(id, dictionary); } }),
      note,
      element("p", { text: `fires on ${(100 * record.frequency).toFixed(2)}% of tokens and ${record.images} images; ` +
                           `mean ${record.mean.toFixed(3)}, max ${record.max.toFixed(3)}` }),
      element("p", { text: `words: ${words}` }),
      tops,
      element("img", { class: "dsae-chart", src: url("chart", { dictionary, id, kind: "histogram" }), alt: "activation histogram" }),
      element("img", { class: "dsae-chart", src: url("chart", { dictionary, id, kind: "timesteps" }), alt: "timestep profile" }));
    grid.style.display = "none";
    more.style.display = "none";
    detail.style.display = "block";
  }

  let typing = null;
  select.addEventListener("change", reload);
  sort.addEventListener("change", reload);
  search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(reload, 250); });
  more.addEventListener("click", loadPage);
  loadDictionaries();
}

app.registerExtension({
  name: "diffusion_sae",
  async setup() {
    app.extensionManager?.registerSidebarTab?.({
      id: "diffusion-sae-features",
      icon: "pi pi-th-large",
      title: "SAE features",
      tooltip: "Diffusion SAE: browse a dictionary's features and use them in Steer",
      type: "custom",
      render: (el) => renderBrowser(el),
    });
  },
  async nodeCreated(node) {
    const type = node.comfyClass || node.type || "";
    if (type === STEER) addSteerPreview(node);
    if (type.startsWith("SAE")) addTextDisplay(node);
  },
});
