#!/usr/bin/env node
// Drives the real ComfyUI frontend in headless Chromium (playwright-core) against a running server that has the
// FlowCache pack loaded. Used by tests/test_browser.py; can also be run by hand.
//
//   node tests/browser/flowcache_browser.js check   # load every shipped workflow, optionally run the demo
//   node tests/browser/flowcache_browser.js video   # FlowCache Video Combine alone: mp4 preview in a <video>
//   node tests/browser/flowcache_browser.js note    # the demo workflow without its cache node, on NOTE_MODEL: the note
//   node tests/browser/flowcache_browser.js export  # maintainers: re-save workflows through the frontend + thumbnails
//
// Environment:
//   COMFY_URL            server URL (default http://127.0.0.1:8188)
//   PACK_NAME            the pack's folder name under custom_nodes (templates are served under it)
//   WORKFLOWS            comma-separated workflow names (default: all listed by GET /workflow_templates for PACK_NAME)
//   OUT_DIR              where screenshots / exported files go (default: cwd)
//   RUN_DEMO=1           check: also queue flowcache_demo_cpu and wait for the video and the compute/reuse map
//   RUN_TIMEOUT_S        check: seconds to wait for the demo run (default 900)
//   DEMO_PRESET          run the demo with this preset (on its FlowCache Cache node) instead of the workflow's
//   CALIBRATED_MODEL     check: a model file whose calibrated presets the cache node must show (default my_finetune.safetensors)
//   NOTE_MODEL, NOTE_STEPS  note: the (small) model file and steps of the run without a cache node
//   FIT_NODES=1          export: size the sampler, cache and prompt schedule nodes to their widgets before saving
//   PLAYWRIGHT_CORE_DIR  node_modules folder holding playwright-core (default /tmp/pw/node_modules)
//   CHROMIUM             chromium executable (default: `which chromium`)
//
// Prints one line "RESULT <json>" (check) and exits 0; exits 1 with "FAIL <message>" on an unexpected error.
// Assertions are made by the Python test on the JSON, so every finding is reported, not just the first.
"use strict";

const fs = require("fs");
const path = require("path");
const { execSync } = require("child_process");

const PW_DIR = process.env.PLAYWRIGHT_CORE_DIR || "/tmp/pw/node_modules";
const { chromium } = require(path.join(PW_DIR, "playwright-core"));

const URL_BASE = (process.env.COMFY_URL || "http://127.0.0.1:8188").replace(/\/$/, "");
const PACK = process.env.PACK_NAME || "flowcache-video";
const OUT = process.env.OUT_DIR || process.cwd();
const MODE = process.argv[2] || "check";
const DEMO = "flowcache_demo_cpu";

function chromiumPath() {
  if (process.env.CHROMIUM) return process.env.CHROMIUM;
  return execSync("which chromium").toString().trim();
}

async function getJSON(page, url) {
  return page.evaluate(async (u) => {
    const r = await fetch(u, { cache: "no-store" });
    return { status: r.status, type: r.headers.get("content-type"), body: r.ok ? await r.text() : null };
  }, url);
}

async function openEditor(browser, logs) {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("console", (m) => {
    if (m.type() === "warning" || m.type() === "error") logs.push(`console.${m.type()}: ${m.text().slice(0, 400)}`);
  });
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  page.on("response", (r) => {
    if (r.status() >= 400) logs.push(`http ${r.status()} ${r.url()}`);
  });
  page.on("requestfailed", (r) => logs.push(`requestfailed ${r.url()} ${r.failure()?.errorText || ""}`));
  await page.goto(URL_BASE + "/", { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas, null, { timeout: 90000 });
  // our extension is imported with the others; wait for its setup
  await page.waitForFunction(() => window.__flowcache && window.__flowcache.ready, null, { timeout: 30000 })
    .catch(() => {});
  await page.waitForTimeout(500);
  return page;
}

/** Texts of open dialogs and toasts; closes the dialogs. */
async function collectPopups(page) {
  const found = await page.evaluate(() => ({
    dialogs: [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText.replace(/\s+/g, " ").slice(0, 300)),
    toasts: [...document.querySelectorAll(".p-toast-message")].map((t) => ({
      severity: ([...t.classList].find((c) => /p-toast-message-(info|success|warn|error|secondary|contrast)/.test(c)) || "")
        .replace("p-toast-message-", ""),
      text: t.innerText.replace(/\s+/g, " ").slice(0, 300),
    })),
  }));
  for (let i = 0; i < 3; i++) {
    const open = await page.$$(".p-dialog");
    if (!open.length) break;
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
  await page.evaluate(() => document.querySelectorAll(".p-toast-message .p-toast-close-button").forEach((b) => b.click()));
  return found;
}

/** Loads one template the way the Templates dialog does and compares the editor's graph with the file. */
async function loadAndInspect(page, name) {
  const url = `/api/workflow_templates/${encodeURIComponent(PACK)}/${encodeURIComponent(name)}.json`;
  const res = await getJSON(page, url);
  if (res.status !== 200) return { name, error: `GET ${url} -> ${res.status}` };
  const wf = JSON.parse(res.body);
  const thumb = await getJSON(page, url.replace(/\.json$/, ".jpg"));
  await page.evaluate(async (data) => {
    await window.app.loadGraphData(data.wf, true, true, data.name);
  }, { wf, name });
  await page.waitForTimeout(1200);
  await presetsSettled(page);
  const popups = await collectPopups(page);
  const inspect = await page.evaluate((wf) => {
    const app = window.app;
    const same = (a, b) => (typeof a === "number" && typeof b === "number" ? Math.abs(a - b) <= 1e-6 * Math.max(1, Math.abs(b)) : JSON.stringify(a) === JSON.stringify(b));
    const nodes = [];
    for (const jn of wf.nodes) {
      const n = app.graph.getNodeById(jn.id);
      const rec = { id: jn.id, type: jn.type, problems: [] };
      if (!n) {
        rec.problems.push("node not in graph");
        nodes.push(rec);
        continue;
      }
      if (!(jn.type in LiteGraph.registered_node_types)) rec.problems.push("type not registered");
      if (n.has_errors) rec.problems.push("node has_errors");
      const ws = (n.widgets || []).filter((w) => w.serialize !== false);
      const vals = jn.widgets_values || [];
      rec.widgets = ws.map((w) => w.name);
      if (ws.length !== vals.length) rec.problems.push(`widget count ${ws.length} != ${vals.length} values in file`);
      ws.forEach((w, i) => {
        if (i < vals.length && !same(w.value, vals[i])) rec.problems.push(`widget ${w.name}=${JSON.stringify(w.value)} but file has ${JSON.stringify(vals[i])}`);
        if (w.type === "combo" && Array.isArray(w.options?.values) && w.options.values.length && !w.options.values.includes(w.value)) {
          rec.comboOutsideList = (rec.comboOutsideList || []).concat([w.name]);
        }
      });
      for (const input of jn.inputs || []) {
        if (input.link == null) continue;
        const slot = n.inputs?.find((i) => i.name === input.name);
        if (!slot || slot.link == null) rec.problems.push(`input ${input.name} lost its link`);
      }
      if (jn.type === "FlowCacheCache") {
        const get = (k) => n.widgets.find((w) => w.name === k);
        const knobs = ["threshold", "warmup_steps", "kv_budget", "mix_lambda"];
        rec.locked = Object.fromEntries(knobs.map((k) => [k, !!get(k)?.disabled]));
        rec.shown = Object.fromEntries(knobs.map((k) => [k, get(k)?._displayValue]));
        rec.values = Object.fromEntries(knobs.map((k) => [k, get(k)?.value]));
        rec.method = get("method")?.value;
        rec.preset = get("preset")?.value;
        rec.fc = n.__fcPreset || null;
      }
      if (jn.type === "FlowCacheSampler") rec.widgetsOnSampler = (n.widgets || []).map((w) => w.name);
      nodes.push(rec);
    }
    const linkCount = app.graph.links?.size ?? Object.keys(app.graph.links || {}).length;
    return { nodes, links: linkCount, fileLinks: wf.links.length };
  }, wf);
  let prompt = null;
  try {
    prompt = await page.evaluate(async () => {
      const p = await window.app.graphToPrompt();
      const out = {};
      for (const [id, n] of Object.entries(p.output)) out[id] = { class_type: n.class_type, inputs: Object.keys(n.inputs) };
      return out;
    });
  } catch (e) {
    prompt = { error: String(e) };
  }
  return { name, status: res.status, thumb: { status: thumb.status, type: thumb.type }, popups, ...inspect, prompt };
}

/** Waits until no cache node is waiting for the server's preset answer. */
async function presetsSettled(page) {
  await page.waitForFunction(() => {
    const nodes = window.app.graph._nodes.filter((n) => n.type === "FlowCacheCache");
    return nodes.every((n) => n.__fcPreset && n.__fcPreset.source !== "pending");
  }, null, { timeout: 15000 }).catch(() => {});
  await page.waitForTimeout(100);
}

/** The cache node's knobs as the user sees them. */
async function cacheSnap(page) {
  return page.evaluate(() => {
    const n = window.app.graph._nodes.find((x) => x.type === "FlowCacheCache");
    const w = (k) => n.widgets.find((x) => x.name === k);
    return { threshold: w("threshold").value, warmup: w("warmup_steps").value, kv: w("kv_budget").value,
      mix: w("mix_lambda").value, locked: ["threshold", "warmup_steps", "kv_budget", "mix_lambda"].every((k) => !!w(k).disabled),
      unlocked: ["threshold", "warmup_steps", "kv_budget", "mix_lambda"].every((k) => !w(k).disabled),
      shown: w("threshold")._displayValue, shownKv: w("kv_budget")._displayValue, fc: n.__fcPreset };
  });
}

/** Sets a widget as the canvas does when the user picks a value (value, then its callback). */
async function setWidget(page, type, name, value) {
  await page.evaluate(({ type, name, value }) => {
    const n = window.app.graph._nodes.find((x) => x.type === type);
    const w = n.widgets.find((x) => x.name === name);
    w.value = value;
    w.callback?.(value);
  }, { type, name, value });
  await page.waitForTimeout(100);
  await presetsSettled(page);
}

async function canvasClip(page) {
  const box = await page.evaluate(() => {
    const c = document.querySelector("#graph-canvas") || document.querySelector("canvas");
    const r = c.getBoundingClientRect();
    return { x: r.x, y: r.y, width: r.width, height: r.height };
  });
  return box;
}

async function fitView(page) {
  await page.evaluate(() => {
    try {
      const c = window.app.canvas;
      if (c.ds && window.app.graph) {
        const nodes = window.app.graph._nodes;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const n of nodes) {
          x0 = Math.min(x0, n.pos[0]);
          y0 = Math.min(y0, n.pos[1] - 30);
          x1 = Math.max(x1, n.pos[0] + n.size[0]);
          y1 = Math.max(y1, n.pos[1] + n.size[1]);
        }
        const cw = c.canvas.width / (window.devicePixelRatio || 1), ch = c.canvas.height / (window.devicePixelRatio || 1);
        const scale = Math.min(cw / (x1 - x0 + 60), ch / (y1 - y0 + 60), 1.2);
        c.ds.scale = scale;
        c.ds.offset = [-x0 + (cw / scale - (x1 - x0)) / 2, -y0 + (ch / scale - (y1 - y0)) / 2];
        c.setDirty(true, true);
      }
    } catch (e) {
      console.warn("fitView", e);
    }
  });
  await page.waitForTimeout(400);
}

async function hideChrome(page) {
  // minimap and the graph-canvas menu are noise on thumbnails
  await page.addStyleTag({ content: ".litegraph-minimap, .minimap-main-container, .p-toast, .graph-canvas-menu, " +
    "[class*='canvas-menu'] { display: none !important; }" });
  await page.evaluate(() => {
    try {
      window.app.canvas.show_info = false;
      // text at any zoom: a tall graph is fitted below the level-of-detail threshold (8 px text), where the canvas
      // would draw the nodes as empty boxes
      window.app.canvas.min_font_size_for_lod = 0;
      window.app.canvas.setDirty(true, true);
    } catch (_) {}
  });
}

/** Queue the demo workflow and wait for the video preview and the per-chunk map. */
async function runDemo(page, timeoutS) {
  await page.evaluate(() => {
    window.__fcTest = { errors: [], events: [] };
    const api = window.app.api;
    for (const ev of ["execution_error", "execution_interrupted"]) {
      api.addEventListener(ev, ({ detail }) => window.__fcTest.errors.push({ ev, detail: JSON.stringify(detail).slice(0, 2000) }));
    }
    for (const ev of ["execution_start", "execution_success", "flowcache.progress", "flowcache.stats", "executed"]) {
      api.addEventListener(ev, ({ detail }) => {
        if (window.__fcTest.events.length < 5000) window.__fcTest.events.push(ev);
      });
    }
  });
  if (process.env.DEMO_PRESET) {
    // e.g. "custom" while the demo model has no embedded slow/fast presets yet
    await page.evaluate((preset) => {
      const n = window.app.graph._nodes.find((x) => x.type === "FlowCacheCache");
      const w = n.widgets.find((x) => x.name === "preset");
      w.value = preset;
      w.callback?.(preset);
    }, process.env.DEMO_PRESET);
  }
  const t0 = Date.now();
  await page.evaluate(async () => {
    await window.app.queuePrompt(0, 1);
  });
  const sampler = await page.evaluate(() => String(window.app.graph._nodes.find((n) => n.type === "FlowCacheSampler").id));
  const combine = await page.evaluate(() => String(window.app.graph._nodes.find((n) => n.type === "FlowCacheVideoCombine").id));
  let progressSeen = null;
  const deadline = Date.now() + timeoutS * 1000;
  let state = null;
  while (Date.now() < deadline) {
    state = await page.evaluate((ids) => {
      const fc = window.__flowcache || {};
      const videos = [...document.querySelectorAll("video")].map((v) => ({
        src: v.currentSrc || v.src, ready: v.readyState, w: v.videoWidth, h: v.videoHeight,
        visible: !!(v.offsetWidth && v.offsetHeight), duration: v.duration,
      }));
      const sampler = window.app.graph.getNodeById(Number(ids.sampler)) || window.app.graph.getNodeById(ids.sampler);
      return {
        errors: window.__fcTest.errors,
        drawn: fc.drawn ? fc.drawn[ids.sampler] : null,
        stats: fc.stats && fc.stats[ids.sampler] ? {
          flops_speedup: fc.stats[ids.sampler].flops_speedup, computed: fc.stats[ids.sampler].computed,
          reused: fc.stats[ids.sampler].reused, windows: (fc.stats[ids.sampler].maps || []).length,
          kv_peak_bytes: fc.stats[ids.sampler].kv_peak_bytes,
        } : null,
        progress: fc.progress ? fc.progress[ids.sampler] : null,
        progressDrawn: !!(sampler && sampler.__fcInfo && sampler.__fcInfo.progress),
        note: fc.stats && fc.stats[ids.sampler] ? fc.stats[ids.sampler].note : null,
        mapsAttr: document.body.dataset.flowcacheMaps || null,
        videos,
        eventCounts: window.__fcTest.events.reduce((a, e) => ((a[e] = (a[e] || 0) + 1), a), {}),
        extErrors: fc.errors || [],
      };
    }, { sampler, combine });
    if (state.progress && !progressSeen) progressSeen = { ...state.progress, drawn: state.progressDrawn };
    if (state.errors.length) break;
    const video = state.videos.find((v) => /\.mp4/.test(v.src) && v.ready >= 2);
    if (state.drawn && video) break;
    await page.waitForTimeout(1000);
  }
  state.seconds = (Date.now() - t0) / 1000;
  state.progressSeen = progressSeen;
  return state;
}

async function check(browser) {
  const logs = [];
  const page = await openEditor(browser, logs);
  const result = { pack: PACK, mode: "check" };
  result.extension = await page.evaluate(() => ({
    registered: window.app.extensions.filter((e) => e.name === "FlowCache.UI").length,
    registeredFrom: window.__flowcache && window.__flowcache.registered,
    ready: !!(window.__flowcache && window.__flowcache.ready),
    errors: (window.__flowcache && window.__flowcache.errors) || [],
    types: ["FlowCacheSampler", "FlowCacheCache", "FlowCacheModelLoader", "FlowCacheDecode", "FlowCacheVideoCombine", "FlowCacheDemoTextEncode",
      "FlowCacheDecodeSave", "FlowCacheMagiTextEncode", "FlowCacheMagiVAELoader", "FlowCacheCausalOptions",
      "FlowCachePromptSchedule"]
      .filter((t) => t in LiteGraph.registered_node_types),
  }));
  const exts = await getJSON(page, "/extensions");
  result.extensionUrls = exts.status === 200 ? JSON.parse(exts.body).filter((u) => /flowcache/i.test(u)) : [];
  const listing = await getJSON(page, "/api/workflow_templates");
  result.templates = listing.status === 200 ? JSON.parse(listing.body)[PACK] || [] : [];
  const names = process.env.WORKFLOWS ? process.env.WORKFLOWS.split(",").filter(Boolean) : result.templates;
  result.workflows = [];
  for (const name of names) {
    const r = await loadAndInspect(page, name);
    result.workflows.push(r);
    await hideChrome(page);
    await fitView(page);
    await page.screenshot({ path: path.join(OUT, `loaded_${name}.png`), clip: await canvasClip(page) });
  }
  if (names.includes("skyreels_v2_df_1.3b_t2v_fast")) {
    // its model file is not in this server's models folder: locked, "from model", until a known file is picked
    await loadAndInspect(page, "skyreels_v2_df_1.3b_t2v_fast");
    const it = (result.interaction = {});
    it.start = await cacheSnap(page);
    await setWidget(page, "FlowCacheModelLoader", "model_name", process.env.CALIBRATED_MODEL || "my_finetune.safetensors");
    it.fromFile = await cacheSnap(page);
    it.fromFile.answer = await page.evaluate((name) => window.__flowcache.filePresets[name], process.env.CALIBRATED_MODEL || "my_finetune.safetensors");
    await setWidget(page, "FlowCacheCache", "preset", "custom");
    it.custom = await cacheSnap(page);
    await setWidget(page, "FlowCacheCache", "threshold", 0.3);
    it.customEdited = await cacheSnap(page);
    await setWidget(page, "FlowCacheCache", "preset", "slow");
    it.slow = await cacheSnap(page);
    await setWidget(page, "FlowCacheCache", "method", "teacache");
    await setWidget(page, "FlowCacheCache", "preset", "fast");
    it.teacacheFast = await cacheSnap(page);
    await setWidget(page, "FlowCacheCache", "method", "off");
    it.off = await cacheSnap(page);
    await setWidget(page, "FlowCacheCache", "method", "flowcache");
    it.flowcacheFast = await cacheSnap(page);
    // the API prompt: the sampler takes the cache node's output; the knobs are the cache node's
    it.prompt = await page.evaluate(async () => {
      const p = await window.app.graphToPrompt();
      const entries = Object.entries(p.output);
      const [cid, cache] = entries.find(([, n]) => n.class_type === "FlowCacheCache");
      const [, sampler] = entries.find(([, n]) => n.class_type === "FlowCacheSampler");
      return { cacheInputs: cache.inputs, samplerCache: sampler.inputs.cache, cacheId: cid };
    });
    // unplugged: locked, and the values are the model's at run time
    await page.evaluate(() => {
      const s = window.app.graph._nodes.find((x) => x.type === "FlowCacheSampler");
      s.disconnectInput(s.inputs.findIndex((i) => i.name === "cache"));
    });
    await page.waitForTimeout(200);
    await presetsSettled(page);
    it.unlinked = await cacheSnap(page);
    await hideChrome(page);
    await fitView(page);
    await page.screenshot({ path: path.join(OUT, "cache_node_interaction.png"), clip: await canvasClip(page) });
  }
  if (process.env.RUN_DEMO === "1") {
    await loadAndInspect(page, DEMO);
    await hideChrome(page);
    await fitView(page);
    result.demo = await runDemo(page, Number(process.env.RUN_TIMEOUT_S || 900));
    await page.waitForTimeout(1500); // let the video paint a frame
    await fitView(page);
    await page.screenshot({ path: path.join(OUT, "demo_run.png") });
    result.demo.screenshot = path.join(OUT, "demo_run.png");
    result.demo.extErrorsAfter = await page.evaluate(() => window.__flowcache.errors);
  }
  result.logs = logs.slice(0, 200);
  console.log("RESULT " + JSON.stringify(result));
}

/** The demo workflow without its cache node, on a small model: the sampler draws the run's note under its map. */
async function noteRun(browser) {
  const logs = [];
  const page = await openEditor(browser, logs);
  const r = await loadAndInspect(page, DEMO);
  const model = process.env.NOTE_MODEL || "tiny_demo_space.safetensors";
  await setWidget(page, "FlowCacheModelLoader", "model_name", model);
  await setWidget(page, "FlowCacheSampler", "steps", Number(process.env.NOTE_STEPS || 6));
  await page.evaluate(() => {
    const n = window.app.graph._nodes.find((x) => x.type === "FlowCacheCache");
    window.app.graph.remove(n);
  });
  await page.waitForTimeout(300);
  const state = await runDemo(page, Number(process.env.RUN_TIMEOUT_S || 300));
  await page.waitForTimeout(800);
  await hideChrome(page);
  await fitView(page);
  await page.screenshot({ path: path.join(OUT, "note_run.png"), clip: await canvasClip(page) });
  state.prompt = await page.evaluate(async () => {
    const p = await window.app.graphToPrompt();
    return Object.values(p.output).map((n) => n.class_type);
  });
  // FlowCache Load Model ran: its notes (what it decided) are drawn under its widgets until another model is picked
  const loaderState = () => page.evaluate(async () => {
    const n = window.app.graph._nodes.find((x) => x.type === "FlowCacheModelLoader");
    const w = (n.widgets || []).find((x) => x.name === "flowcache_notes");
    window.app.canvas.setDirty(true, true);
    await new Promise((r) => setTimeout(r, 300)); // let the canvas draw a frame
    const drawn = window.__flowcache.notesDrawn[String(n.id)];
    return { notes: n.__fcNotes ? n.__fcNotes.notes : null, drawnLines: drawn ? drawn.lines : null,
      height: w ? w.computeSize(n.size[0])[1] : null, widgetSerialized: w ? w.serialize : null, nodeHeight: n.size[1] };
  });
  const loaderNotes = { after: await loaderState() };
  loaderNotes.promptInputs = await page.evaluate(async () => {
    const p = await window.app.graphToPrompt();
    return Object.keys(Object.values(p.output).find((n) => n.class_type === "FlowCacheModelLoader").inputs);
  });
  await page.evaluate(() => { // the grown loader may now reach into the nodes below it: move those down for the screenshot
    const n = window.app.graph._nodes.find((x) => x.type === "FlowCacheModelLoader");
    const bottom = n.pos[1] + n.size[1] + 40;
    const below = window.app.graph._nodes.filter((o) => o !== n && o.pos[1] > n.pos[1] && o.pos[0] < n.pos[0] + n.size[0]
      && o.pos[0] + o.size[0] > n.pos[0]);
    const dy = Math.max(0, bottom - Math.min(...below.map((o) => o.pos[1]), Infinity));
    for (const o of below) o.pos[1] += dy;
    window.app.canvas.setDirty(true, true);
  });
  await hideChrome(page);
  await fitView(page);
  await page.screenshot({ path: path.join(OUT, "loader_notes.png"), clip: await canvasClip(page) });
  await setWidget(page, "FlowCacheModelLoader", "model_name", "flowcache-demo (built-in, runs on CPU)");
  loaderNotes.cleared = await loaderState();
  state.loaderNotes = loaderNotes;
  state.extErrorsAfter = await page.evaluate(() => window.__flowcache.errors);
  console.log("RESULT " + JSON.stringify({ mode: "note", loaded: r, ...state, logs }));
}

/** FlowCache Video Combine alone (frames from core EmptyImage): the stock frontend previews its mp4 in a <video>. */
async function videoSmoke(browser) {
  const logs = [];
  const page = await openEditor(browser, logs);
  const prompt = {
    1: { class_type: "EmptyImage", inputs: { width: 64, height: 48, batch_size: 12, color: 0x3366cc } },
    2: { class_type: "FlowCacheVideoCombine", inputs: { images: ["1", 0], frame_rate: 8, loop_count: 0,
      filename_prefix: "FlowCacheTest/smoke", format: "video/h264-mp4", crf: 19 } },
  };
  await page.evaluate(async (p) => {
    window.__fcTest = { errors: [], executed: [] };
    window.app.api.addEventListener("execution_error", ({ detail }) => window.__fcTest.errors.push(JSON.stringify(detail).slice(0, 2000)));
    window.app.api.addEventListener("executed", ({ detail }) => window.__fcTest.executed.push(detail));
    await window.app.loadApiJson(p, "flowcache_video_smoke");
    await window.app.queuePrompt(0, 1);
  }, prompt);
  let state = null;
  const deadline = Date.now() + 120000;
  while (Date.now() < deadline) {
    state = await page.evaluate(() => ({
      errors: window.__fcTest.errors,
      executed: window.__fcTest.executed,
      videos: [...document.querySelectorAll("video")].map((v) => ({
        src: v.currentSrc || v.src, ready: v.readyState, w: v.videoWidth, h: v.videoHeight,
        visible: !!(v.offsetWidth && v.offsetHeight), controls: v.controls, loop: v.loop,
      })),
      previewWidgets: window.app.graph._nodes.filter((n) => n.type === "FlowCacheVideoCombine")
        .map((n) => ({ media: n.previewMediaType, widgets: (n.widgets || []).map((w) => w.name) })),
    }));
    // ready and laid out: the <video> can have its data a moment before the node's DOM widget is placed
    if (state.errors.length || state.videos.some((v) => v.ready >= 2 && v.visible)) break;
    await page.waitForTimeout(500);
  }
  await page.waitForTimeout(800);
  await page.screenshot({ path: path.join(OUT, "video_smoke.png") });
  console.log("RESULT " + JSON.stringify({ mode: "video", ...state, logs }));
}

/** Whether fontconfig has a font for Chinese text (headless Chromium draws boxes for glyphs it has no font for). */
function hasCJKFont() {
  try {
    return execSync("fc-list :lang=zh family").toString().trim().length > 0;
  } catch (_) {
    return false;
  }
}

/** Maintainers: re-save each workflow as the frontend serialises it (canonical 0.4 format) and make thumbnails. */
async function exportWorkflows(browser) {
  const logs = [];
  const page = await openEditor(browser, logs);
  const listing = JSON.parse((await getJSON(page, "/api/workflow_templates")).body)[PACK] || [];
  const names = process.env.WORKFLOWS ? process.env.WORKFLOWS.split(",").filter(Boolean) : listing;
  const cjkFont = hasCJKFont();
  for (const name of names) {
    const r = await loadAndInspect(page, name);
    const text = JSON.stringify(await page.evaluate(() => window.app.graph.serialize()));
    if (!cjkFont && /[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]/.test(text)) {
      // e.g. the Chinese negative prompt of the Wan workflows: install a CJK font (Debian: fonts-wqy-microhei)
      console.log(`WARNING ${name}: it holds CJK text and fontconfig has no CJK font (fc-list :lang=zh is empty): ` +
        "its thumbnail will show boxes; install one, e.g. apt-get install fonts-wqy-microhei");
    }
    if (process.env.FIT_NODES === "1") {
      await page.evaluate(() => {
        for (const n of window.app.graph._nodes) {
          if (!["FlowCacheSampler", "FlowCacheCache", "FlowCachePromptSchedule"].includes(n.type)) continue;
          const size = n.computeSize();
          n.setSize([Math.max(n.size[0], size[0]), size[1]]);
        }
        window.app.graph.setDirtyCanvas(true, true);
      });
    }
    const wf = await page.evaluate(() => window.app.graph.serialize());
    if (wf.extra) delete wf.extra.ds; // no saved view: the editor fits the graph on load
    fs.writeFileSync(path.join(OUT, `${name}.json`), JSON.stringify(wf, null, 2) + "\n");
    await hideChrome(page);
    await fitView(page);
    if (name === DEMO && process.env.RUN_DEMO === "1") {
      const st = await runDemo(page, Number(process.env.RUN_TIMEOUT_S || 900));
      console.log("demo run", JSON.stringify({ drawn: st.drawn, errors: st.errors, seconds: st.seconds }));
      await page.waitForTimeout(1500);
      await fitView(page);
    }
    await page.screenshot({ path: path.join(OUT, `${name}.jpg`), type: "jpeg", quality: 85, clip: await canvasClip(page) });
    console.log("exported", name, JSON.stringify(r.popups));
  }
  console.log(logs.filter((l) => !/ERR_NAME_NOT_RESOLVED|fetching file size|Failed to fetch/.test(l)).slice(0, 50).join("\n"));
}

(async () => {
  const browser = await chromium.launch({
    executablePath: chromiumPath(),
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  try {
    if (MODE === "export") await exportWorkflows(browser);
    else if (MODE === "video") await videoSmoke(browser);
    else if (MODE === "note") await noteRun(browser);
    else await check(browser);
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.log("FAIL " + (e && e.stack ? e.stack : e));
  process.exit(1);
});
