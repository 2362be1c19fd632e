// Drives the real ComfyUI editor in headless Chromium (Debian's /usr/bin/chromium through playwright-core)
// against a running ComfyUI server with this pack, and writes what it saw as JSON for
// tests/web/test_editor.py to assert on. Usage: node tests/web/editor_check.mjs CONFIG.json RESULT.json
//
// Phases:
//   1. extension disabled (setting Comfy.Extension.Disabled): the editor starts, every shipped workflow
//      loads with all node types known (the pack works without its web extension);
//   2. extension enabled: it registers, loads its palette, logs no errors; every shipped workflow loads
//      without a missing-node warning; subject indices/colours follow the encode chain; screenshots;
//   3. templates: the pack's example_workflows as the template browser gets them (/api/workflow_templates,
//      <name>.json, <name>.jpg); each is loaded and queued with the Run button against random stand-ins with
//      the public files' names (validation only: the run is interrupted as soon as it starts); layout
//      measured in the editor (node boxes with title and badge, widget text vs node width, badges);
//   4. the two-subject template (smaller size, fewer steps) is queued with the Run button; the
//      live routing maps arrive on the Apply and Preview nodes while sampling; the Preview node ends
//      with its grid, drawn at a readable scale; screenshots.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const [configPath, resultPath] = process.argv.slice(2);
const cfg = JSON.parse(fs.readFileSync(configPath, "utf8"));
const wants = (p) => !cfg.phases || cfg.phases.includes(p); // default: every phase
const out = { phases: {}, screenshots: [], console: [], pageErrors: [], extensionFiles: [], timings: {} };
const t0 = Date.now();
const mark = (name) => (out.timings[name] = (Date.now() - t0) / 1000);
const save = () => fs.writeFileSync(resultPath, JSON.stringify(out, null, 1));
fs.mkdirSync(cfg.artifacts, { recursive: true });

async function setSettings(values) {
  const res = await fetch(`${cfg.url}/api/settings`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(values),
  });
  if (!res.ok) throw new Error(`POST /api/settings: HTTP ${res.status}`);
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "anystory-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: cfg.chromium,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
  ],
  viewport: { width: cfg.viewport?.[0] ?? 1400, height: cfg.viewport?.[1] ?? 860 },
  deviceScaleFactor: 1,
});

let phase = "start";
function attach(page) {
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") {
      const loc = m.location();
      out.console.push({ phase, type: m.type(), text: m.text().slice(0, 2000), url: loc?.url || "" });
    }
  });
  page.on("pageerror", (e) => out.pageErrors.push({ phase, message: e.message, stack: String(e.stack || "").slice(0, 3000) }));
  page.on("response", (r) => {
    if (r.url().includes("/extensions/comfyui-anystory/")) out.extensionFiles.push({ phase, url: r.url(), status: r.status() });
  });
}

async function openEditor(page) {
  await page.goto(cfg.url + "/", { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph, null, { timeout: 120000 });
  // let the start-up workflow load first so it cannot replace ours later
  await page.waitForFunction(() => window.comfyAPI.app.app.graph.nodes.length > 0, null, { timeout: 20000 }).catch(() => {});
  await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    window.__anystoryTest = { missing: [], events: [] };
    app.registerExtension({
      name: "anystory.test.probe",
      afterConfigureGraph(missing) {
        window.__anystoryTest.missing.push((missing || []).map((m) => (typeof m === "string" ? m : m.type)));
      },
    });
    const api = window.comfyAPI.api.api;
    window.__anystoryTest.queued = [];
    const queuePrompt = api.queuePrompt.bind(api);
    api.queuePrompt = async (...args) => {
      try {
        const res = await queuePrompt(...args);
        window.__anystoryTest.queued.push({ ok: true, promptId: res?.prompt_id, nodeErrors: res?.node_errors ?? {} });
        return res;
      } catch (e) {
        window.__anystoryTest.queued.push({ ok: false, error: String(e?.message || e).slice(0, 2000), nodeErrors: e?.response?.node_errors ?? null });
        throw e;
      }
    };
    for (const ev of ["execution_start", "execution_success", "execution_error", "execution_interrupted", "executed", "anystory.routing"]) {
      api.addEventListener(ev, ({ detail }) => {
        const d = ev === "anystory.routing" ? { node: detail.node, step: detail.step, steps: detail.steps, final: detail.final, bytes: detail.image?.length } : ev === "executed" ? { node: detail.node, promptId: detail.prompt_id } : { promptId: detail?.prompt_id };
        window.__anystoryTest.events.push({ ev, t: performance.now(), ...d });
      });
    }
  });
}

async function fitView(page) {
  await page.evaluate(async () => {
    const app = window.comfyAPI.app.app;
    app.canvas.deselectAll?.();
    await app.extensionManager.command.execute("Comfy.Canvas.FitView");
    app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(400);
}

async function loadWorkflow(page, name, graph) {
  return await page.evaluate(async ({ name, graph }) => {
    const app = window.comfyAPI.app.app;
    const T = window.__anystoryTest;
    const before = T.missing.length;
    await app.loadGraphData(graph, true, true, name);
    await new Promise((r) => setTimeout(r, 300));
    const unknown = graph.nodes.map((n) => n.type).filter((t) => !(t in window.LiteGraph.registered_node_types));
    const dialogs = [...document.querySelectorAll(".p-dialog")].filter((d) => d.offsetParent !== null).map((d) => d.innerText.slice(0, 500));
    const nodes = app.graph.nodes.map((n) => ({ id: n.id, type: n.type, size: [...n.size] }));
    const info = { missing: T.missing.slice(before).flat(), unknown, dialogs, nodes, count: nodes.length };
    if (window.AnyStory) {
      info.subjects = {};
      for (const n of app.graph.nodes) {
        if (n.type === "AnyStorySubjectEncode") {
          const i = window.AnyStory.subjectIndex(n);
          info.subjects[n.id] = { index: i, color: window.AnyStory.subjectColor(i), chain: window.AnyStory.subjectChain(n) };
        }
        if (n.type === "AnyStoryApply") {
          info.applyPreviews = { ...(info.applyPreviews || {}), [n.id]: window.AnyStory.previewTargets(n) };
        }
      }
      info.badges = Object.fromEntries(app.graph.nodes.filter((n) => String(n.type).startsWith("AnyStory")).map((n) => [n.id, (n.badges || []).map((b) => (typeof b === "function" ? b() : b)?.text).filter(Boolean)]));
      info.colors = Object.fromEntries(app.graph.nodes.filter((n) => String(n.type).startsWith("AnyStory")).map((n) => [n.id, n.color]));
    }
    return info;
  }, { name, graph });
}

/** What the editor draws for the current graph: node boxes (title bar and the badge above it included),
 *  widget texts that do not fit their node, nodes smaller than their content, visible badges per node. */
async function measureLayout(page) {
  return await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const LG = window.LiteGraph;
    const ctx = document.createElement("canvas").getContext("2d");
    const visible = (b) => {
      const x = typeof b === "function" ? b() : b;
      return !!x && String(x.text ?? "").trim().length > 0 && x.visible !== false;
    };
    const nodes = [];
    for (const n of app.graph.nodes) {
      const badges = (n.badges || []).filter(visible).length;
      const top = LG.NODE_TITLE_HEIGHT + (badges ? 22 : 0);
      const box = [n.pos[0], n.pos[1] - top, n.size[0], n.size[1] + top];
      const clipped = [];
      ctx.font = `normal ${LG.NODE_SUBTEXT_SIZE}px ${LG.NODE_FONT}`;
      for (const w of n.widgets || []) {
        if (!["combo", "number", "text"].includes(w.type)) continue;
        const label = String(w.label || w.name);
        const value = String(w._displayValue ?? w.value);
        const need = ctx.measureText(label).width + 5 + ctx.measureText(value).width;
        const avail = n.size[0] - (2 * 15 + 5) - 2 * 15 - 20; // BaseWidget.drawTruncatingText's area
        if (need > avail) clipped.push({ widget: label, value, need: Math.round(need), avail: Math.round(avail) });
      }
      ctx.font = `${LG.NODE_TEXT_SIZE}px ${LG.NODE_FONT}`;
      const title = String(n.getTitle?.() ?? n.title ?? "");
      const titleNeed = ctx.measureText(title).width + LG.NODE_TITLE_HEIGHT + 10;
      if (titleNeed > n.size[0]) clipped.push({ widget: "(title)", value: title, need: Math.round(titleNeed), avail: n.size[0] });
      const cs = n.computeSize();
      nodes.push({ id: n.id, type: n.type, box, size: [...n.size], min: [Math.round(cs[0]), Math.round(cs[1])], clipped,
        badges, badgeEntries: (n.badges || []).length });
    }
    const overlaps = [];
    for (let i = 0; i < nodes.length; i++) {
      for (let j = i + 1; j < nodes.length; j++) {
        const [a, b] = [nodes[i].box, nodes[j].box];
        if (a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3]) overlaps.push([nodes[i].id, nodes[j].id]);
      }
    }
    return { nodes, overlaps };
  });
}

/** Queue the loaded graph with the Run button; as soon as the server starts it, interrupt it (validation is
 *  what counts here) and wait until the server is idle again. */
async function queueValidateOnly(page, timeoutS) {
  const before = await page.evaluate(() => window.__anystoryTest.queued.length);
  await page.evaluate(() => { window.__anystoryTest.events.length = 0; });
  const button = page.locator("button", { hasText: /^\s*Run\s*$/ }).first();
  let queuedWith = "Run button";
  try {
    await button.click({ timeout: 5000 });
  } catch {
    await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Comfy.QueuePrompt"));
    queuedWith = "Comfy.QueuePrompt command";
  }
  await page.waitForFunction((n) => window.__anystoryTest.queued.length > n, before, { timeout: 60000 });
  const res = await page.evaluate((n) => window.__anystoryTest.queued[n], before);
  res.queuedWith = queuedWith;
  res.lastNodeErrors = await page.evaluate(() => window.comfyAPI.app.app.lastNodeErrors ?? null);
  if (res.ok) {
    const started = await page.waitForFunction((id) => window.__anystoryTest.events.some((e) => e.ev === "execution_start" && e.promptId === id), res.promptId, { timeout: 60000 }).then(() => true).catch(() => false);
    await fetch(`${cfg.url}/api/interrupt`, { method: "POST" });
    await fetch(`${cfg.url}/api/queue`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ clear: true }) });
    res.started = started;
    const deadline = Date.now() + timeoutS * 1000;
    for (;;) {
      const q = await (await fetch(`${cfg.url}/api/queue`)).json();
      if (!q.queue_running?.length && !q.queue_pending?.length) break;
      if (Date.now() > deadline) { res.stuck = true; break; }
      await fetch(`${cfg.url}/api/interrupt`, { method: "POST" });
      await new Promise((r) => setTimeout(r, 500));
    }
    res.ended = await page.evaluate((id) => window.__anystoryTest.events.filter((e) => e.promptId === id).map((e) => e.ev), res.promptId);
  }
  // close an error dialog the editor may have opened
  await page.keyboard.press("Escape").catch(() => {});
  return res;
}

async function shot(page, name, clip) {
  const file = path.join(cfg.artifacts, `${name}.png`);
  await page.screenshot({ path: file, clip });
  out.screenshots.push(file);
  return file;
}

/** Screen rectangle around some graph nodes (canvas coordinates → page pixels). */
async function nodesClip(page, ids, pad = 24) {
  return await page.evaluate(({ ids, pad }) => {
    const app = window.comfyAPI.app.app;
    const rect = app.canvas.canvas.getBoundingClientRect();
    const ds = app.canvas.ds;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const id of ids) {
      const n = app.graph.getNodeById(id);
      if (!n) continue;
      const title = window.LiteGraph.NODE_TITLE_HEIGHT + 24; // title + badges above it
      const [ax, ay] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
      const [bx, by] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
      x0 = Math.min(x0, ax); y0 = Math.min(y0, ay); x1 = Math.max(x1, bx); y1 = Math.max(y1, by);
    }
    const x = Math.max(rect.left, rect.left + x0 - pad), y = Math.max(rect.top, rect.top + y0 - pad);
    const w = Math.min(rect.right, rect.left + x1 + pad) - x, h = Math.min(rect.bottom, rect.top + y1 + pad) - y;
    return { x: Math.round(x), y: Math.round(y), width: Math.round(w), height: Math.round(h) };
  }, { ids, pad });
}

async function focusOn(page, ids) {
  // select the nodes and fit the view to them (ComfyUI's own "fit view to selected nodes")
  await page.evaluate(async (ids) => {
    const app = window.comfyAPI.app.app;
    const nodes = ids.map((id) => app.graph.getNodeById(id)).filter(Boolean);
    app.canvas.deselectAll?.();
    for (const n of nodes) app.canvas.select?.(n);
    await app.extensionManager.command.execute("Comfy.Canvas.FitView");
    app.canvas.deselectAll?.();
    app.graph.setDirtyCanvas(true, true);
  }, ids);
  await page.waitForTimeout(400);
}

try {
  // -------------------------------------------------------------------------------------------
  phase = "disabled";
  await setSettings({ ...cfg.settings, "Comfy.Extension.Disabled": [cfg.extension] });
  let page = context.pages()[0] ?? (await context.newPage());
  attach(page);
  await openEditor(page);
  const disabled = { anystoryGlobal: await page.evaluate(() => typeof window.AnyStory), workflows: {} };
  disabled.registered = await page.evaluate((n) => window.comfyAPI.app.app.extensions.some((e) => e.name === n), cfg.extension);
  for (const [name, graph] of Object.entries(cfg.workflows)) {
    const r = await loadWorkflow(page, name, graph);
    disabled.workflows[name] = { missing: r.missing, unknown: r.unknown, dialogs: r.dialogs, count: r.count };
  }
  out.phases.disabled = disabled;
  mark("disabled");
  save();

  // -------------------------------------------------------------------------------------------
  phase = "enabled";
  await setSettings({ "Comfy.Extension.Disabled": [] });
  await page.close();
  page = await context.newPage();
  attach(page);
  await openEditor(page);
  await page.waitForFunction(() => window.AnyStory?.ready, null, { timeout: 30000 });
  const enabled = { workflows: {} };
  Object.assign(enabled, await page.evaluate((n) => ({
    registered: window.comfyAPI.app.app.extensions.some((e) => e.name === n),
    palette: window.AnyStory.palette,
    background: window.AnyStory.background,
  }), cfg.extension));
  for (const [name, graph] of Object.entries(cfg.workflows)) {
    enabled.workflows[name] = await loadWorkflow(page, name, graph);
    await fitView(page);
    await shot(page, `editor_${name}`);
  }
  out.phases.enabled = enabled;
  mark("enabled");
  save();

  // -------------------------------------------------------------------------------------------
  phase = "templates";
  const templates = { list: await (await fetch(`${cfg.url}/api/workflow_templates`)).json(), items: {} };
  for (const name of cfg.templates.names) {
    const base = `${cfg.url}/api/workflow_templates/${cfg.templates.module}/${name}`;
    const item = {};
    const j = await fetch(`${base}.json`);
    item.jsonStatus = j.status;
    const t = await fetch(`${base}.jpg`);
    item.thumbStatus = t.status;
    item.thumbType = t.headers.get("content-type");
    item.thumbBytes = (await t.arrayBuffer()).byteLength;
    if (j.ok) {
      const graph = await j.json();
      item.load = await loadWorkflow(page, name, graph);
      item.layout = await measureLayout(page);
      await fitView(page);
      const ids = await page.evaluate(() => window.comfyAPI.app.app.graph.nodes.map((n) => n.id));
      await shot(page, `template_${name}`, await nodesClip(page, ids, 16)); // the graph only: the thumbnail
      if (wants("queue")) item.queue = await queueValidateOnly(page, cfg.templates.timeout_s);
    }
    templates.items[name] = item;
    save();
  }
  out.phases.templates = templates;
  mark("templates");
  save();

  // -------------------------------------------------------------------------------------------
  if (!wants("run")) throw new Error("done: the run phase was not asked for");
  phase = "run";
  const run = { ids: cfg.run.ids };
  run.load = await loadWorkflow(page, cfg.run.name, cfg.run.graph);
  await focusOn(page, cfg.run.focus); // zoom in on the Apply and Preview nodes: the live maps show there
  const applyId = cfg.run.ids.apply;
  const previewId = cfg.run.ids.preview;
  await page.evaluate(() => { window.__anystoryTest.events.length = 0; });
  // the Run button of the editor (falls back to the same command the button runs)
  const button = page.locator("button", { hasText: /^\s*Run\s*$/ }).first();
  try {
    await button.click({ timeout: 5000 });
    run.queuedWith = "Run button";
  } catch {
    await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Comfy.QueuePrompt"));
    run.queuedWith = "Comfy.QueuePrompt command";
  }
  // a live frame: the first map drawn on the Apply node (and on the Preview node)
  await page.waitForFunction(() => (window.AnyStory.stats.images >= 1 && window.AnyStory.stats.previewUpdates >= 1)
    || window.__anystoryTest.events.some((e) => e.ev === "execution_error"), null, { timeout: cfg.run.timeout_s * 1000 });
  run.firstImageAt = (Date.now() - t0) / 1000;
  await page.waitForTimeout(100);
  await shot(page, "live_first_map", await nodesClip(page, cfg.run.focus));
  await page.waitForFunction(() => window.__anystoryTest.events.some((e) => e.ev === "execution_success" || e.ev === "execution_error"), null, { timeout: cfg.run.timeout_s * 1000 });
  mark("run finished");
  // the preview node's own grid (a /view URL of the anystory_routing_* temp file) replaces the live maps
  await page.waitForFunction((id) => {
    const n = window.comfyAPI.app.app.graph.getNodeById(id);
    return n?.imgs?.length && String(n.imgs[0].src).includes("anystory_routing") && n.imgs[0].complete;
  }, previewId, { timeout: 30000 }).catch(() => {});
  await page.waitForTimeout(500);
  Object.assign(run, await page.evaluate(({ applyId, previewId, loaderId }) => {
    const app = window.comfyAPI.app.app;
    const apply = app.graph.getNodeById(applyId);
    const preview = app.graph.getNodeById(previewId);
    const loader = app.graph.getNodeById(loaderId);
    const live = apply?.__anystory?.live;
    return {
      stats: JSON.parse(JSON.stringify(window.AnyStory.stats)),
      events: window.__anystoryTest.events,
      applyLive: live ? { step: live.step, steps: live.steps, final: live.final, labels: live.labels, colors: live.colors, img: live.img?.naturalWidth || 0 } : null,
      applySize: apply ? [...apply.size] : null,
      applyBadge: (apply?.badges || []).map((b) => (typeof b === "function" ? b() : b)?.text).filter(Boolean),
      previewImgs: (preview?.imgs || []).map((i) => ({ src: String(i.src).slice(0, 200), w: i.naturalWidth, h: i.naturalHeight })),
      previewOutput: app.nodeOutputs?.[String(previewId)] ?? null,
      loaderInfo: loader?.__anystory?.info ?? null,
      loaderSize: loader ? [...loader.size] : null,
      encodeSubjects: app.graph.nodes.filter((n) => n.type === "AnyStorySubjectEncode").map((n) => ({ id: n.id, subject: n.__anystory?.subject ?? null })),
    };
  }, { applyId, previewId, loaderId: cfg.run.ids.loader }));
  // the grid as the editor draws it (renderPreview: scale = min(width / w, (height - y - 15) / h, 1))
  await page.waitForFunction((id) => (window.comfyAPI.app.app.graph.getNodeById(id)?.__anystory?.grid), previewId, { timeout: 15000 }).catch(() => {});
  await page.waitForTimeout(300);
  run.grid = await page.evaluate((id) => {
    const n = window.comfyAPI.app.app.graph.getNodeById(id);
    const img = n?.imgs?.[0];
    if (!img?.naturalWidth) return null;
    const pw = n.widgets?.find((w) => w.name === window.AnyStory.previewWidget);
    const y = pw?.y || window.AnyStory.imageTop(n);
    const scale = Math.min(n.size[0] / img.naturalWidth, (n.size[1] - y - 15) / img.naturalHeight, 1);
    return { w: img.naturalWidth, h: img.naturalHeight, y, size: [...n.size], scale, fit: n.__anystory?.grid ?? null };
  }, previewId);
  run.layoutAfter = await measureLayout(page);
  await shot(page, "after_run_routing", await nodesClip(page, cfg.run.focus));
  await fitView(page);
  await shot(page, "after_run_editor");
  out.phases.run = run;
  mark("run");
  await page.close();
} catch (e) {
  out.fatal = String(e?.stack || e);
} finally {
  save();
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
