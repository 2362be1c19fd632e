// AnyStory editor extension (ComfyUI frontend 1.2x extension API).
//
// - Live routing preview: the server (nodes/live.py) sends an "anystory.routing" message after each
//   sampling step with a small map (subjects in palette order, background dark, striped = decided by a
//   region mask). It is drawn on the AnyStoryApply node that made it and, until their own grid arrives,
//   on the AnyStoryRoutingPreview nodes fed by that Apply node.
// - Subject colours: the palette comes from GET /anystory/palette (anystory/preview.py PALETTE_HEX, the
//   one source of truth); a subject's index is its position in the chain of AnyStorySubjectEncode nodes
//   (walking the `subjects` inputs), shown as a coloured badge and stripe on each encode node and as a
//   legend on the Apply node. An encode node's warnings (e.g. no usable subject mask) are drawn as text
//   at its bottom.
// - AnyStory nodes get a node colour and ONE badge: the editor's own badge (node source / id) and ours
//   (subject index, live step) are merged into one, ours first when it has something to say.
// - The Routing Preview's grid is shown at a readable size: when it arrives the node grows (never shrinks)
//   so the grid is drawn at full scale up to GRID_MAX, and never below GRID_MIN_SCALE.
// - The model loaders show their `info` text after a run.
//
// Everything here is presentation: workflows, /prompt and the node outputs are the same without it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "anystory.editor";
const EVENT = "anystory.routing";
const T = {
  loader: "AnyStoryModelLoader",
  unifiedLoader: "AnyStoryLoader", // the loader with presets: drawn like the model loader
  encode: "AnyStorySubjectEncode",
  apply: "AnyStoryApply",
  applySimple: "AnyStoryApplySimple", // the simple Apply: drawn like the (advanced) Apply
  preview: "AnyStoryRoutingPreview",
  text: "AnyStoryTextEncode",
};
const ANYSTORY_TYPES = new Set(Object.values(T));
const NODE_COLOR = "#3a2f63";
const NODE_BGCOLOR = "#28243a";
const BADGE_BG = "#4b3f86";
const UNKNOWN_COLOR = "#8a8a8a";
const PANEL_PAD = 8;
const OUR_BADGE = "__anystoryBadge";
const PREVIEW_WIDGET = "$$canvas-image-preview"; // the editor's image widget (frontend 1.2x)
const GRID_MAX = [560, 720]; // the routing grid is shown at full scale up to this size …
const GRID_MIN_SCALE = 0.5; // … and larger grids at no less than half scale
const IMAGE_SIZE_TEXT = 15; // the "w × h" line the editor may draw under an image

// Shared state (window.AnyStory once the extension is set up; tests/web read it).
const AnyStory = {
  extension: EXTENSION,
  ready: false,
  palette: null, // subject colours in order
  background: "#1c1c22",
  stats: { events: 0, images: 0, previewUpdates: 0, byNode: {}, lastStep: null, errors: 0, gridFits: 0 },
  subjectIndex: null, // exported helpers (set below)
  subjectColor: null,
};

// ------------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------------
function subjectColor(i, fallback) {
  const p = AnyStory.palette;
  if (p && p.length) return p[((i % p.length) + p.length) % p.length];
  return fallback || UNKNOWN_COLOR;
}

function textColorOn(hex) {
  const h = String(hex || "").replace("#", "");
  if (h.length < 6) return "#fff";
  const [r, g, b] = [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16) / 255);
  return 0.299 * r + 0.587 * g + 0.114 * b > 0.6 ? "#111" : "#fff";
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

/** The node feeding input `name` of `node`, skipping Reroute nodes; null if none. */
function upstream(node, name) {
  try {
    const slot = node.inputs?.findIndex((i) => i.name === name) ?? -1;
    if (slot < 0 || !node.graph) return null;
    let n = node.getInputNode(slot);
    for (let guard = 0; n && n.type === "Reroute" && guard < 64; guard++) n = n.getInputNode(0);
    return n || null;
  } catch {
    return null;
  }
}

/** Encode nodes of the chain ending at `node` (or feeding its `subjects` input), first subject first. */
function subjectChain(node) {
  const chain = [];
  const seen = new Set();
  let n = node.type === T.encode ? node : upstream(node, "subjects");
  while (n && n.type === T.encode && !seen.has(n)) {
    seen.add(n);
    chain.unshift(n);
    n = upstream(n, "subjects");
  }
  return chain;
}

/** A subject's index = its position in the chain of encode nodes (0 = first subject). */
function subjectIndex(node) {
  return Math.max(0, subjectChain(node).length - 1);
}

function subjectLabel(node, i) {
  const label = String(widgetValue(node, "label") ?? "").trim();
  return label || `subject ${i + 1}`;
}

/** AnyStoryRoutingPreview nodes fed by an Apply node's `routing` output (through Reroutes). */
function previewTargets(applyNode) {
  const out = [];
  const slot = applyNode.outputs?.findIndex((o) => o.name === "routing") ?? -1;
  if (slot < 0) return out;
  const walk = (node, s, depth) => {
    let targets = [];
    try {
      targets = node.getOutputNodes(s) || [];
    } catch {
      targets = [];
    }
    for (const t of targets) {
      if (t.type === T.preview) out.push(t);
      else if (t.type === "Reroute" && depth < 64) walk(t, 0, depth + 1);
    }
  };
  walk(applyNode, slot, 0);
  return out;
}

/** The node with execution id "12" or "5:12" (node 12 inside subgraph node 5). */
function nodeByExecutionId(id) {
  const parts = String(id).split(":");
  let graph = app.graph;
  let node = null;
  for (const part of parts) {
    if (!graph) return null;
    node = graph.getNodeById(Number.isNaN(Number(part)) ? part : Number(part));
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function dirty() {
  app.graph?.setDirtyCanvas(true, true);
}

function ensureHeight(node, height) {
  if (node.size && node.size[1] < height) {
    node.setSize([node.size[0], height]);
    dirty();
  }
}

function wrapText(ctx, text, width) {
  const lines = [];
  for (const para of String(text).split("\n")) {
    let line = "";
    for (const word of para.split(/\s+/)) {
      const next = line ? `${line} ${word}` : word;
      if (ctx.measureText(next).width > width && line) {
        lines.push(line);
        line = word;
      } else {
        line = next;
      }
    }
    lines.push(line);
  }
  return lines;
}

/** A title-bar badge (duck-typed like litegraph's LGraphBadge: height, visible, getWidth, draw). */
class Badge {
  constructor(text, bgColor = BADGE_BG, fgColor = "#fff") {
    this.text = text;
    this.bgColor = bgColor;
    this.fgColor = fgColor;
    this.fontSize = 12;
    this.padding = 6;
    this.height = 20;
  }
  get visible() {
    return !!this.text;
  }
  getWidth(ctx) {
    if (!this.visible) return 0;
    const font = ctx.font;
    ctx.font = `${this.fontSize}px sans-serif`;
    const w = ctx.measureText(this.text).width + 2 * this.padding;
    ctx.font = font;
    return w;
  }
  draw(ctx, x, y) {
    if (!this.visible) return;
    const { font, fillStyle, textBaseline, textAlign } = ctx;
    const w = this.getWidth(ctx);
    ctx.font = `${this.fontSize}px sans-serif`;
    ctx.fillStyle = this.bgColor;
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, w, this.height, 5);
    else ctx.rect(x, y, w, this.height);
    ctx.fill();
    ctx.fillStyle = this.fgColor;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(this.text, x + this.padding, y + this.height / 2 + 1);
    Object.assign(ctx, { font, fillStyle, textBaseline, textAlign });
  }
}

const isApply = (type) => type === T.apply || type === T.applySimple;
const isLoader = (type) => type === T.loader || type === T.unifiedLoader;

/** The node's type name; inside `nodeCreated` (called from the constructor) `node.type` is not set yet. */
function typeOf(node) {
  return node?.constructor?.comfyClass ?? node?.comfyClass ?? node?.type;
}

function liveOf(node) {
  node.__anystory ??= { live: null, info: null, subject: null };
  return node.__anystory;
}

/** Our badge for a node, or null when it has nothing to add to the editor's own badge. */
function ourBadge(node, type) {
  if (type === T.encode) {
    const i = subjectIndex(node);
    const col = subjectColor(i, liveOf(node).subject?.color);
    const warn = liveOf(node).subject?.warnings?.length ? " ⚠" : "";
    return new Badge(`● ${i + 1} · ${subjectLabel(node, i)}${warn}`, col, textColorOn(col));
  }
  const live = liveOf(node).live;
  if (isApply(type) && live) return new Badge(`AnyStory · ${live.step + 1}/${live.steps}`);
  if (type === T.preview && live) return new Badge(`live ${live.step + 1}/${live.steps}`);
  return null;
}

function evalBadge(b) {
  try {
    return typeof b === "function" ? b() : b;
  } catch {
    return null;
  }
}

/** Replace a node's badges (the editor's source/id badge, ours) by one: ours when it has something to say
 *  (prefixed with the node id when the editor shows ids), else the editor's. */
function mergeBadges(node) {
  const list = node.badges;
  if (!Array.isArray(list) || (list.length === 1 && list[0]?.[OUR_BADGE])) return;
  const ours = list.find((b) => b?.[OUR_BADGE]);
  const others = list.filter((b) => b !== ours);
  const merged = () => {
    const core = others.map(evalBadge).filter((b) => b && String(b.text ?? "").trim());
    const mine = ours ? evalBadge(ours) : null;
    if (mine?.visible) {
      const id = core.map((b) => String(b.text).match(/^#\d+/)?.[0]).find(Boolean);
      if (id) mine.text = `${id} ${mine.text}`;
      return mine;
    }
    return core[0] ?? new Badge("");
  };
  merged[OUR_BADGE] = true;
  node.badges = [merged];
}

/** Top of the image area of a node (below its widgets), in node coordinates. */
function imageTop(node) {
  const pw = node.widgets?.find((w) => w.name === PREVIEW_WIDGET);
  if (pw && pw.y > 0) return pw.y;
  let top = 0;
  for (const w of node.widgets ?? []) {
    if (w === pw) continue;
    const h = w.computeSize?.(node.size[0])?.[1] ?? window.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20;
    top = Math.max(top, (w.last_y ?? w.y ?? 0) + h + 4);
  }
  return top || node.computeSize()[1];
}

/** Grow a Routing Preview node so its grid image is drawn readable: full scale up to GRID_MAX, larger
 *  grids scaled to fit GRID_MAX but never below GRID_MIN_SCALE. True once done for this image. */
function fitGrid(node) {
  const img = node.imgs?.[0];
  if (!img?.naturalWidth || !String(img.src).includes("anystory_routing")) return false;
  const [w, h] = [img.naturalWidth, img.naturalHeight];
  const scale = Math.max(GRID_MIN_SCALE, Math.min(1, GRID_MAX[0] / w, GRID_MAX[1] / h));
  const top = imageTop(node);
  const need = [Math.ceil(w * scale), Math.ceil(top + h * scale + IMAGE_SIZE_TEXT + 4)];
  if (node.size[0] < need[0] || node.size[1] < need[1]) {
    node.setSize([Math.max(node.size[0], need[0]), Math.max(node.size[1], need[1])]);
    dirty();
  }
  liveOf(node).grid = { w, h, scale, src: String(img.src).slice(0, 200) };
  AnyStory.stats.gridFits += 1;
  return true;
}

/** After the first draw of the grid the image widget's real top is known: fit once more (outside the draw). */
function settleGrid(node) {
  const st = liveOf(node);
  if (!st.grid || st.gridSettled) return;
  st.gridSettled = true;
  setTimeout(() => fitGrid(node), 0);
}

function fitGridWhenLoaded(node, tries = 0) {
  if (fitGrid(node) || tries > 100) return;
  setTimeout(() => fitGridWhenLoaded(node, tries + 1), 100);
}

// ------------------------------------------------------------------------------------------------
// drawing
// ------------------------------------------------------------------------------------------------
const MAP_MAX = 192;

function applyPanelLayout(node) {
  const top = node.computeSize()[1] + 2;
  const width = node.size[0] - 2 * PANEL_PAD;
  const map = Math.max(64, Math.min(MAP_MAX, width));
  const legendRows = Math.max(1, Math.ceil((applyLegend(node).length + 1) / 2));
  const height = 22 + map + 8 + legendRows * 16 + 6;
  return { top, width, map, height };
}

function applyLegend(node) {
  const live = liveOf(node).live;
  if (live?.labels?.length) return live.labels.map((label, i) => [label, live.colors?.[i] || subjectColor(i)]);
  return subjectChain(node).map((n, i) => [subjectLabel(n, i), subjectColor(i)]);
}

function drawApplyPanel(node, ctx) {
  const { top, width, map, height } = applyPanelLayout(node);
  if (node.size[1] < top + height + PANEL_PAD) return; // ensured by the size hooks; never resize while drawing
  const live = liveOf(node).live;
  const x0 = PANEL_PAD;
  ctx.save();
  ctx.fillStyle = "#15131f";
  ctx.strokeStyle = "#4b3f86";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x0, top, width, height, 6);
  else ctx.rect(x0, top, width, height);
  ctx.fill();
  ctx.stroke();
  ctx.font = "12px sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillStyle = "#ddd";
  const status = !live
    ? "routing: waiting for a render"
    : `routing · step ${live.step + 1}/${live.steps}${live.final ? " · done" : ""}${live.mode ? ` · ${live.mode}` : ""}`;
  ctx.fillText(status, x0 + 6, top + 11);
  // progress bar
  if (live) {
    ctx.fillStyle = "#2d2a3d";
    ctx.fillRect(x0 + 6, top + 19, width - 12, 3);
    ctx.fillStyle = "#8f7fe0";
    ctx.fillRect(x0 + 6, top + 19, ((width - 12) * (live.step + 1)) / Math.max(1, live.steps), 3);
  }
  // map
  const my = top + 26;
  const img = live?.img;
  if (img && img.naturalWidth) {
    const s = Math.min(map / img.naturalWidth, map / img.naturalHeight);
    const w = img.naturalWidth * s;
    const h = img.naturalHeight * s;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, x0 + (width - w) / 2, my + (map - h) / 2, w, h);
    ctx.imageSmoothingEnabled = true;
  } else {
    ctx.fillStyle = AnyStory.background;
    ctx.fillRect(x0 + (width - map) / 2, my, map, map);
    ctx.fillStyle = "#777";
    ctx.textAlign = "center";
    ctx.fillText("maps show here while sampling", x0 + width / 2, my + map / 2);
    ctx.textAlign = "left";
  }
  if (live?.warning) {
    // e.g. the attention router cannot start within this run's steps (nodes/live.py sends why)
    ctx.font = "11px sans-serif";
    const lines = wrapText(ctx, `⚠ ${live.warning}`, width - 20);
    ctx.fillStyle = "rgba(58, 22, 22, 0.92)";
    ctx.fillRect(x0 + 4, my, width - 8, lines.length * 13 + 6);
    ctx.fillStyle = "#ffd27a";
    ctx.textBaseline = "top";
    lines.forEach((line, i) => ctx.fillText(line, x0 + 8, my + 3 + i * 13));
    ctx.textBaseline = "middle";
    ctx.font = "12px sans-serif";
  }
  // legend: subjects in order, then the background
  const items = [...applyLegend(node), ["background", live?.background || AnyStory.background]];
  const colW = (width - 12) / 2;
  items.forEach(([label, color], i) => {
    const lx = x0 + 6 + (i % 2) * colW;
    const ly = my + map + 8 + Math.floor(i / 2) * 16;
    ctx.fillStyle = color;
    ctx.fillRect(lx, ly, 11, 11);
    ctx.strokeStyle = "#aaa";
    ctx.strokeRect(lx, ly, 11, 11);
    ctx.fillStyle = "#ddd";
    let text = String(label);
    while (text.length > 3 && ctx.measureText(text).width > colW - 20) text = text.slice(0, -2);
    ctx.fillText(text === String(label) ? text : `${text}…`, lx + 16, ly + 6);
  });
  ctx.restore();
}

function loaderInfoLayout(node, ctx) {
  const info = liveOf(node).info;
  if (!info) return null;
  const top = node.computeSize()[1] + 2;
  const width = node.size[0] - 2 * PANEL_PAD;
  ctx.font = "11px sans-serif";
  const lines = wrapText(ctx, info.split(/;\s*/).join("\n"), width - 12);
  return { top, width, lines, height: lines.length * 14 + 10 };
}

function drawLoaderInfo(node, ctx) {
  ctx.save();
  const lay = loaderInfoLayout(node, ctx);
  if (!lay) {
    ctx.restore();
    return;
  }
  if (node.size[1] < lay.top + lay.height + PANEL_PAD) {
    ctx.restore();
    ensureHeight(node, lay.top + lay.height + PANEL_PAD); // after a run: grow once, next frame draws
    return;
  }
  ctx.fillStyle = "#15131f";
  ctx.fillRect(PANEL_PAD, lay.top, lay.width, lay.height);
  ctx.fillStyle = "#cfc8ff";
  ctx.textBaseline = "top";
  lay.lines.forEach((line, i) => ctx.fillText(line, PANEL_PAD + 6, lay.top + 5 + i * 14));
  ctx.restore();
}

function encodeWarnings(node) {
  const st = liveOf(node);
  const w = st.warnings ?? st.subject?.warnings;
  return Array.isArray(w) ? w.map((x) => String(x).replace(/^AnyStory( FLUX)?:\s*/, "")) : [];
}

function drawEncodeWarnings(node, ctx) {
  // the encode node's warnings (no usable subject mask, …) as text at the bottom of the node
  const warnings = encodeWarnings(node);
  if (!warnings.length) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  const width = node.size[0] - 2 * PANEL_PAD;
  const lines = wrapText(ctx, warnings.map((w) => `⚠ ${w}`).join("\n"), width - 12);
  const height = lines.length * 14 + 10;
  const need = node.computeSize()[1] + height + PANEL_PAD + 96; // keeps room for the crop preview
  if (node.size[1] < need) {
    ctx.restore();
    ensureHeight(node, need); // grow once, next frame draws
    return;
  }
  const top = node.size[1] - height - PANEL_PAD;
  ctx.fillStyle = "#3a1616";
  ctx.fillRect(PANEL_PAD, top, width, height);
  ctx.fillStyle = "#ffd27a";
  ctx.textBaseline = "top";
  lines.forEach((line, i) => ctx.fillText(line, PANEL_PAD + 6, top + 5 + i * 14));
  ctx.restore();
  AnyStory.stats.warningsDrawn = (AnyStory.stats.warningsDrawn || 0) + 1;
}

function drawEncodeStripe(node, ctx) {
  if (node.flags?.collapsed) return;
  const color = subjectColor(subjectIndex(node), liveOf(node).subject?.color);
  ctx.save();
  ctx.fillStyle = color;
  ctx.fillRect(0, 0, 4, node.size[1]);
  ctx.restore();
}

// ------------------------------------------------------------------------------------------------
// live messages
// ------------------------------------------------------------------------------------------------
function upscaled(img, factor) {
  // a crisp (nearest-neighbour) larger copy for the core image preview, which smooths when it scales
  const c = document.createElement("canvas");
  c.width = img.naturalWidth * factor;
  c.height = img.naturalHeight * factor;
  const g = c.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(img, 0, 0, c.width, c.height);
  const out = new Image();
  out.src = c.toDataURL("image/png");
  return out;
}

function onRouting(detail) {
  const stats = AnyStory.stats;
  stats.events += 1;
  stats.byNode[detail.node] = (stats.byNode[detail.node] || 0) + 1;
  stats.lastStep = { node: detail.node, step: detail.step, steps: detail.steps, final: !!detail.final };
  const node = nodeByExecutionId(detail.node);
  if (!node) return;
  const seq = stats.events;
  const img = new Image();
  img.onload = () => {
    const st = liveOf(node);
    if ((st.seq ?? -1) > seq) return; // a later step's map was decoded first
    st.seq = seq;
    stats.images += 1;
    st.live = { ...detail, img };
    const lay = applyPanelLayout(node);
    ensureHeight(node, lay.top + lay.height + PANEL_PAD);
    const factor = Math.max(1, Math.floor(384 / Math.max(img.naturalWidth, img.naturalHeight)));
    for (const target of previewTargets(node)) {
      const ts = liveOf(target);
      if (ts.done) continue; // its own grid of this run is there
      target.imgs = [factor > 1 ? upscaled(img, factor) : img];
      target.imageIndex = 0;
      ts.live = { step: detail.step, steps: detail.steps, final: !!detail.final };
      stats.previewUpdates += 1;
    }
    dirty();
  };
  img.onerror = () => {
    stats.errors += 1;
  };
  img.src = detail.image;
}

// ------------------------------------------------------------------------------------------------
// the extension
// ------------------------------------------------------------------------------------------------
app.registerExtension({
  name: EXTENSION,

  async setup() {
    window.AnyStory = AnyStory; // shared state, read by the browser tests and handy in the devtools
    try {
      const res = await api.fetchApi("/anystory/palette");
      if (res.ok) {
        const p = await res.json();
        AnyStory.palette = p.subjects;
        AnyStory.background = p.background || AnyStory.background;
      }
    } catch {
      // older server without the route: colours come with each preview message
    }
    api.addEventListener(EVENT, ({ detail }) => {
      try {
        onRouting(detail);
      } catch (e) {
        AnyStory.stats.errors += 1;
        console.warn("[AnyStory] live preview:", e);
      }
    });
    api.addEventListener("execution_start", () => {
      for (const node of app.graph?.nodes ?? []) {
        if (node.type === T.preview && node.__anystory) {
          Object.assign(node.__anystory, { live: null, done: false, grid: null, gridSettled: false });
        }
      }
    });
    AnyStory.ready = true;
    dirty();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!ANYSTORY_TYPES.has(nodeData?.name)) return;
    const type = nodeData.name;
    const proto = nodeType.prototype;

    const onDrawForeground = proto.onDrawForeground;
    proto.onDrawForeground = function (ctx, ...rest) {
      const r = onDrawForeground?.apply(this, [ctx, ...rest]);
      if (this.badges?.length > 1) mergeBadges(this); // a badge added after onAdded: one again next frame
      if (this.flags?.collapsed) return r;
      try {
        if (type === T.preview) settleGrid(this);
        if (isApply(type)) drawApplyPanel(this, ctx);
        else if (type === T.encode) {
          drawEncodeStripe(this, ctx);
          drawEncodeWarnings(this, ctx);
        }
        else if (isLoader(type)) drawLoaderInfo(this, ctx);
      } catch (e) {
        AnyStory.stats.errors += 1;
        if (AnyStory.stats.errors < 5) console.warn("[AnyStory] draw:", e);
      }
      return r;
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (output) {
      const r = onExecuted?.apply(this, arguments);
      const st = liveOf(this);
      if (isLoader(type) && output?.text?.length) {
        st.info = output.text.join("\n");
        dirty();
      } else if (type === T.encode && output?.anystory_subject?.length) {
        st.subject = output.anystory_subject[0];
        st.warnings = Array.isArray(output.warnings) ? output.warnings : st.subject.warnings;
        dirty();
      } else if (type === T.preview) {
        st.live = null;
        st.done = true; // live maps stop until the next run starts
        if (output?.images?.length) fitGridWhenLoaded(this);
      }
      return r;
    };

    const onAdded = proto.onAdded;
    proto.onAdded = function () {
      const r = onAdded?.apply(this, arguments);
      mergeBadges(this); // every extension's nodeCreated has run: the editor's badge and ours become one
      return r;
    };
  },

  nodeCreated(node) {
    const type = typeOf(node);
    if (!ANYSTORY_TYPES.has(type)) return;
    if (!node.color) node.color = NODE_COLOR;
    if (!node.bgcolor) node.bgcolor = NODE_BGCOLOR;
    node.badges ??= [];
    const badge = () => ourBadge(node, type);
    badge[OUR_BADGE] = true;
    node.badges.push(badge);
    if (isApply(type)) {
      // a new node gets room for the routing panel; a loaded one keeps its saved size until maps arrive
      const lay = applyPanelLayout(node);
      ensureHeight(node, lay.top + lay.height + PANEL_PAD);
    }
  },
});

AnyStory.subjectIndex = subjectIndex;
AnyStory.warningsOf = (node) => encodeWarnings(node); // the texts drawn on an encode node
AnyStory.subjectChain = (node) => subjectChain(node).map((n) => n.id);
AnyStory.subjectColor = subjectColor;
AnyStory.previewTargets = (node) => previewTargets(node).map((n) => n.id);
AnyStory.imageTop = imageTop;
AnyStory.previewWidget = PREVIEW_WIDGET;
