// Drives the real ComfyUI editor in headless Chromium (Debian's /usr/bin/chromium through playwright-core)
// against a running ComfyUI server with this pack, and writes what it saw as JSON for
// tests/web/test_editor.py to assert on. Usage: node tests/web/editor_check.mjs CONFIG.json RESULT.json
//
// Phases:
//   1. extension disabled (setting Comfy.Extension.Disabled): the editor starts, every shipped workflow
//      loads with all node types known (the pack works without its web extension);
//   2. extension enabled: it registers, loads its palette, logs no errors; every shipped workflow loads
//      without a missing-node warning; subject indices/colours follow the encode chain; screenshots;
//   3. the two-subject graph (file names mapped to the test models) is queued with the Run button; the
//      live routing maps arrive on the Apply and Preview nodes while sampling; the Preview node ends
//      with its grid; screenshots.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const [configPath, resultPath] = process.argv.slice(2);
const cfg = JSON.parse(fs.readFileSync(configPath, "utf8"));
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
    for (const ev of ["execution_start", "execution_success", "execution_error", "executed", "anystory.routing"]) {
      api.addEventListener(ev, ({ detail }) => {
        const d = ev === "anystory.routing" ? { node: detail.node, step: detail.step, steps: detail.steps, final: detail.final, bytes: detail.image?.length } : ev === "executed" ? { node: detail.node } : {};
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
