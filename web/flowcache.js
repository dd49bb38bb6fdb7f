// FlowCache for ComfyUI: frontend extension.
//
// * FlowCache Cache: when `preset` is named (slow/fast/turbo) its number widgets (threshold, warmup_steps, kv_budget,
//   mix_lambda, and any knob a later method adds) are locked and show the values the run will use. They come from the server
//   (GET /flowcache/model_presets?model_name=…, read from the chosen file's headers and a calibrated .presets.json
//   beside it) for the model of the sampler(s) the node's output feeds (FlowCacheSampler.model <- FlowCache Load
//   Model.model_name). Without such a chain, with samplers of different models, or when the server does not know the
//   file, the widgets stay locked and say "from model": the values are the model's, decided at run time. `custom`
//   unlocks them; method `off` locks them all (nothing reads them). A line under the widgets says where the values
//   come from. The Python nodes ignore these widgets for named presets, so this is display only. The pure rules are
//   in flowcache_presets.js.
// * FlowCache Sampler: live progress text from the `flowcache.progress` websocket event; after a run (`executed`
//   with output.flowcache_stats, or the `flowcache.stats` event) a per-chunk compute/reuse map (chunks x steps per
//   window) with the FLOPs speedup, FLOPs saved and peak KV size, and the run's note (e.g. no cache node
//   connected) (drawn by flowcache_map.js).
// * FlowCache Load Model: after it ran (`executed` with output.flowcache_notes) the loader's decisions (the loop and
//   why, which weights of a .pt, distilled or base MAGI-1, the layers) under its widgets (flowcache_notes.js). They
//   describe that load: picking another model_name, loop, weights or magi_variant hides them.
//
// Every hook is wrapped in try/catch: a failure here is reported once (console and window.__flowcache.errors) and
// never breaks the node or the graph.
// Debug/test hook: window.__flowcache (server answers, progress, stats, drawn maps, loader notes, errors) and
// document.body.dataset.flowcacheMaps (number of maps drawn so far).
import { app } from "../../scripts/app.js";
import { drawMap, mapHeight } from "./flowcache_map.js";
import { NAMED_PRESETS, chooseModel, lockPlan, shownText } from "./flowcache_presets.js";
import { NOTE_KEY_WIDGETS, drawNotes, notesFromOutput, notesHeight, notesKey, visibleNotes } from "./flowcache_notes.js";

const EXT_NAME = "FlowCache.UI";
const SAMPLER = "FlowCacheSampler";
const CACHE = "FlowCacheCache";
const LOADER = "FlowCacheModelLoader";
const REROUTE = "Reroute";
const MAP_WIDGET = "flowcache_map";
const SOURCE_WIDGET = "flowcache_source";
const NOTES_WIDGET = "flowcache_notes";
const SOURCE_H = 18;

const state = (window.__flowcache = window.__flowcache || {
  version: 2,
  ready: false, // setup() ran
  filePresets: {}, // model_name -> the server's answer for that file ("pending" while asked, null: no answer)
  tickets: {}, // model_name -> number of the latest request (older answers are dropped)
  progress: {}, // node id -> last progress event
  stats: {}, // node id -> last stats dict
  drawn: {}, // node id -> {windows, chunks, steps, note, at} of the last map drawn
  loaderNotes: {}, // loader node id -> {key, notes} of its last run
  notesDrawn: {}, // loader node id -> {lines, at} of the last time its notes were drawn (lines 0: nothing shown)
  errors: [],
});
state.loaderNotes = state.loaderNotes || {}; // a state object from an older copy of this file
state.notesDrawn = state.notesDrawn || {};

const said = new Set(); // messages already reported: a hook failing on every redraw says so once
function report(where, err) {
  try {
    const msg = `${where}: ${err && err.message ? err.message : err}`;
    if (said.has(msg)) return;
    said.add(msg);
    if (state.errors.length < 50) state.errors.push(msg);
    console.warn(`[FlowCache] ${msg}`);
  } catch (_) {
    /* never throw from the error path */
  }
}

function guard(where, fn) {
  return function (...args) {
    try {
      return fn.apply(this, args);
    } catch (err) {
      report(where, err);
      return undefined;
    }
  };
}

// ------------------------------------------------------------------------------------------------ presets

function widget(node, name) {
  return node?.widgets?.find((w) => w && w.name === name);
}

function classOf(node) {
  return node ? node.comfyClass || node.type : undefined;
}

function linkById(graph, id) {
  if (!graph || id == null) return null;
  return (graph.links?.get ? graph.links.get(id) : graph.links?.[id]) || null;
}

/** The node at the other end of an input's link, through legacy Reroute nodes. */
function inputLinkOrigin(node, inputName, depth = 0) {
  const graph = node?.graph || app.graph;
  const input = inputName == null ? node?.inputs?.[0] : node?.inputs?.find((i) => i && i.name === inputName);
  if (!graph || !input || input.link == null) return null;
  const link = linkById(graph, input.link);
  const origin = link ? graph.getNodeById(link.origin_id) || null : null;
  if (origin && classOf(origin) === REROUTE && depth < 8) return inputLinkOrigin(origin, null, depth + 1);
  return origin;
}

/** Nodes an output slot feeds, through legacy Reroute nodes. */
function outputTargets(node, slot = 0, depth = 0) {
  const graph = node?.graph || app.graph;
  const out = [];
  for (const id of node?.outputs?.[slot]?.links || []) {
    const link = linkById(graph, id);
    const target = link ? graph.getNodeById(link.target_id) : null;
    if (!target) continue;
    if (classOf(target) === REROUTE && depth < 8) out.push(...outputTargets(target, 0, depth + 1));
    else out.push(target);
  }
  return out;
}

// A loader's loop choice other than auto travels with the file name (the presets differ per loop: a causal
// model has rows of its own); a separator no file name holds.
const LOOP_SEP = "\u0001";

/** The model_name chosen on the loader feeding this sampler, with its loop when not auto (null when no
 * FlowCache loader feeds it). */
function modelNameOf(sampler) {
  const loader = inputLinkOrigin(sampler, "model");
  if (!loader || classOf(loader) !== LOADER) return null;
  const v = widget(loader, "model_name")?.value;
  if (v == null || v === "") return null;
  const loop = widget(loader, "loop")?.value;
  return loop && loop !== "auto" ? `${v}${LOOP_SEP}${loop}` : String(v);
}

/** The route's query for a model identity from modelNameOf. */
function presetsQuery(identity) {
  const [name, loop] = String(identity).split(LOOP_SEP);
  return `model_name=${encodeURIComponent(name)}` + (loop ? `&loop=${encodeURIComponent(loop)}` : "");
}

/** {name, reason}: the one model the samplers fed by this cache node use. */
function modelOfCache(node) {
  const samplers = outputTargets(node, 0).filter((n) => classOf(n) === SAMPLER);
  return chooseModel(samplers.map(modelNameOf));
}

/** The server's answer for a file ("pending" while asked), fetched once per name until invalidated. */
function serverAnswer(name) {
  const known = state.filePresets[name];
  if (known !== undefined) return known;
  const api = app.api;
  if (!api?.fetchApi) {
    state.filePresets[name] = null;
    return null;
  }
  const ticket = (state.asked = (state.asked || 0) + 1);
  state.filePresets[name] = "pending";
  state.tickets[name] = ticket;
  api
    .fetchApi(`/flowcache/model_presets?${presetsQuery(name)}`, { cache: "no-cache" })
    .then((resp) => (resp.ok ? resp.json() : { known: false, rows: {}, error: `HTTP ${resp.status}` }))
    .catch((err) => {
      report("model presets", err);
      return null; // an older server without the route: the values come from the model at run time
    })
    .then((data) => {
      if (state.tickets[name] !== ticket) return; // asked again since: a newer answer is on its way
      state.filePresets[name] = data && typeof data === "object" ? data : null;
      refreshAllCaches();
    })
    .catch((err) => report("model presets", err));
  return "pending";
}

/** Forget the server's answers (a model was picked, or links changed): the next refresh asks again. */
function forgetAnswers() {
  for (const [name, v] of Object.entries(state.filePresets)) if (v !== "pending") delete state.filePresets[name];
}

function isLinked(node, w) {
  try {
    const slot = node.getSlotFromWidget?.(w);
    return slot?.link != null;
  } catch (err) {
    report("widget link", err); // the widget is then drawn as unlinked
    return false;
  }
}

function findGetter(obj, prop) {
  let o = Object.getPrototypeOf(obj);
  while (o) {
    const d = Object.getOwnPropertyDescriptor(o, prop);
    if (d && d.get) return d.get;
    o = Object.getPrototypeOf(o);
  }
  return null;
}

/** Locked widgets are `disabled` (greyed, not clickable); litegraph hides a disabled widget's value, so show
 * what the plan says: the run's number, "from model", "unused" or "..." (never a stale number). */
function setLocked(node, w, entry) {
  w.disabled = !!entry?.locked;
  w.__fcEntry = entry || null;
  if (!w.__fcDisplayPatched) {
    const base = findGetter(w, "_displayValue");
    Object.defineProperty(w, "_displayValue", {
      configurable: true,
      get() {
        try {
          if (this.__fcEntry?.locked && !isLinked(node, this)) {
            const text = shownText(this.__fcEntry, this.value, this.options?.precision);
            if (text != null) return text;
          }
        } catch (err) {
          report("locked widget text", err); // the widget draws its own value instead
        }
        return base ? base.call(this) : String(this.value);
      },
    });
    w.__fcDisplayPatched = true;
  }
}

function knobWidgets(node) {
  return (node.widgets || []).filter(
    (w) => w && w.name && w.serialize !== false && w.type !== "button" && !String(w.name).startsWith("flowcache_")
  );
}

/** A drawn, never-saved widget ``name`` on ``node`` (added once; null where the node cannot take one). */
function ensureDrawnWidget(node, name, type, draw, computeSize) {
  const w = widget(node, name);
  if (w || !Array.isArray(node?.widgets) || typeof node.addCustomWidget !== "function") return w || null;
  const added = {
    name,
    type,
    value: null,
    serialize: false, // never in widgets_values (kept last, so no hole either)
    options: { serialize: false }, // never in the API prompt
    draw,
    computeSize,
    mouse: () => false,
  };
  node.addCustomWidget(added);
  return added;
}

/** A one-line text under the cache node's widgets: where the values come from. */
function ensureSourceWidget(node) {
  return ensureDrawnWidget(node, SOURCE_WIDGET, "flowcache_text", guard("draw source", function (ctx, n, width, y) {
    const text = n.__fcPreset?.text;
    if (!text) return;
    ctx.save();
    try {
      ctx.font = "11px sans-serif";
      ctx.textBaseline = "middle";
      ctx.textAlign = "left";
      const src = n.__fcPreset.source;
      ctx.fillStyle = src === "missing" ? "#e0a040" : src === "server" ? "#8fc98f" : "#aaa";
      let t = text;
      while (t.length > 8 && ctx.measureText(t).width > width - 20) t = t.slice(0, -4) + "...";
      ctx.fillText(t, 10, y + SOURCE_H / 2);
    } finally {
      ctx.restore();
    }
  }), (width) => [width ?? node.size?.[0] ?? 0, SOURCE_H]);
}

function refreshCache(node) {
  try {
    const method = widget(node, "method")?.value;
    const preset = widget(node, "preset")?.value;
    const knobs = knobWidgets(node);
    const model = modelOfCache(node);
    const named = NAMED_PRESETS.includes(preset) && method !== "off";
    const answer = named && model.name ? serverAnswer(model.name) : null;
    const plan = lockPlan({ method, preset, knobs: knobs.map((w) => w.name), model, answer });
    for (const w of knobs) {
      const entry = plan.widgets[w.name];
      if (!entry) continue;
      if (entry.value !== undefined && w.value !== entry.value) w.value = entry.value;
      setLocked(node, w, entry);
    }
    node.__fcPreset = { method, preset, model: model.name, reason: model.reason, source: plan.source,
      known: plan.known, key: plan.key, text: plan.text };
    node.setDirtyCanvas?.(true, false);
  } catch (err) {
    report("preset lock", err);
  }
}

function nodesOf(cls) {
  const nodes = app.graph?._nodes || app.graph?.nodes || [];
  return nodes.filter((n) => classOf(n) === cls);
}

function samplers() {
  return nodesOf(SAMPLER);
}

function refreshAllCaches() {
  try {
    for (const n of nodesOf(CACHE)) refreshCache(n);
  } catch (err) {
    report("refresh", err);
  }
}

/** Links or a model changed: ask the server again and refresh every cache node (once per burst of changes). */
function requeryLater() {
  if (state.requeryTimer) return;
  state.requeryTimer = setTimeout(() => {
    state.requeryTimer = null;
    try {
      forgetAnswers();
      refreshAllCaches();
    } catch (err) {
      report("requery", err);
    }
  }, 0);
}

function chainWidgetCallback(w, fn) {
  if (!w || w.__fcChained) return;
  const orig = w.callback;
  w.callback = function (...args) {
    let r;
    try {
      r = orig?.apply(this, args);
    } finally {
      try {
        fn();
      } catch (err) {
        report("widget callback", err);
      }
    }
    return r;
  };
  w.__fcChained = true;
}

// --------------------------------------------------------------------------------------------- the map

function drawMapWidget(ctx, node, width, y) {
  const shown = drawMap(ctx, node.__fcInfo, width, y);
  if (!shown) return;
  const key = String(node.id);
  const first = !state.drawn[key];
  state.drawn[key] = { ...shown, at: Date.now(), speedup: node.__fcInfo.stats.flops_speedup };
  if (first) {
    document.body.dataset.flowcacheMaps = String(Object.keys(state.drawn).length);
  }
}

function ensureMapWidget(node) {
  const draw = guard("draw map", function (ctx, n, width, y) {
    drawMapWidget(ctx, n, width, y);
  });
  return ensureDrawnWidget(node, MAP_WIDGET, "flowcache_map", draw, function (width) {
    try {
      return [width ?? node.size[0], mapHeight(node.__fcInfo, width ?? node.size[0])];
    } catch (err) {
      report("map size", err);
      return [width ?? 0, 0];
    }
  });
}

function fitNode(node) {
  try {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(size[1], 0)]);
  } catch (err) {
    report("resize", err);
  }
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

function nodeForEvent(id) {
  if (id == null) return null;
  const sid = String(id);
  const local = sid.includes(":") ? sid.split(":").pop() : sid;
  const graph = app.graph;
  const node = graph?.getNodeById?.(local) ?? graph?.getNodeById?.(Number(local));
  return node && (node.comfyClass || node.type) === SAMPLER ? node : null;
}

function setProgress(node, detail) {
  node.__fcInfo = node.__fcInfo || {};
  if (node.__fcInfo.stale) {
    node.__fcInfo.stats = null;
    node.__fcInfo.stale = false;
  }
  const firstProgress = !node.__fcInfo.progress;
  node.__fcInfo.progress = { text: detail.text, value: detail.value, max: detail.max };
  ensureMapWidget(node);
  if (firstProgress) fitNode(node);
  else node.setDirtyCanvas?.(true, false);
}

function setStats(node, stats) {
  if (!stats || typeof stats !== "object") return;
  node.__fcInfo = node.__fcInfo || {};
  node.__fcInfo.stats = stats;
  node.__fcInfo.progress = null;
  node.__fcInfo.stale = false;
  state.stats[String(node.id)] = stats;
  ensureMapWidget(node);
  fitNode(node);
}

// ------------------------------------------------------------------------------------------ loader notes

function loaderKey(node) {
  return notesKey(Object.fromEntries(NOTE_KEY_WIDGETS.map((k) => [k, widget(node, k)?.value])));
}

/** The notes of the loader's last run, if they still describe what its widgets would load. */
function shownNotes(node) {
  return visibleNotes(node.__fcNotes, loaderKey(node));
}

function ensureNotesWidget(node) {
  const draw = guard("draw notes", function (ctx, n, width, y) {
    const lines = drawNotes(ctx, shownNotes(n), width, y);
    state.notesDrawn[String(n.id)] = { lines, at: Date.now() };
  });
  return ensureDrawnWidget(node, NOTES_WIDGET, "flowcache_notes", draw, function (width) {
    try {
      const wd = width ?? node.size?.[0] ?? 0;
      return [wd, notesHeight(shownNotes(node), wd)];
    } catch (err) {
      report("notes size", err);
      return [width ?? 0, 0];
    }
  });
}

function setLoaderNotes(node, notes) {
  node.__fcNotes = { key: loaderKey(node), notes };
  state.loaderNotes[String(node.id)] = node.__fcNotes;
  ensureNotesWidget(node);
  fitNode(node);
}

/** A loader widget that decides what is loaded changed: the last run's notes no longer apply. */
function clearLoaderNotes(node) {
  if (!node.__fcNotes) return;
  node.__fcNotes = null;
  delete state.loaderNotes[String(node.id)];
  fitNode(node);
}

// --------------------------------------------------------------------------------------------- register

// The pack's web folder can be served twice (WEB_DIRECTORY under the folder name and pyproject's [tool.comfy] web
// under the project name, when the two differ): register once.
const alreadyRegistered = (() => {
  try {
    return !!(state.registered || (app.extensions || []).some((e) => e && e.name === EXT_NAME));
  } catch (err) {
    report("registration check", err); // registered anyway: a second copy at worst draws twice
    return false;
  }
})();

const extension = {
  name: EXT_NAME,

  async setup() {
    try {
      const api = app.api;
      api.addEventListener(
        "flowcache.progress",
        guard("progress event", ({ detail }) => {
          state.progress[String(detail?.node)] = detail;
          const node = nodeForEvent(detail?.node);
          if (node) setProgress(node, detail);
        })
      );
      api.addEventListener(
        "flowcache.stats",
        guard("stats event", ({ detail }) => {
          const node = nodeForEvent(detail?.node);
          if (node) setStats(node, detail?.stats);
        })
      );
      const clearProgress = guard("end of run", () => {
        for (const n of samplers()) {
          if (n.__fcInfo?.progress) {
            n.__fcInfo.progress = null;
            fitNode(n);
          }
        }
      });
      api.addEventListener(
        "execution_start",
        guard("execution_start event", () => {
          for (const n of samplers()) if (n.__fcInfo) n.__fcInfo.stale = true; // a new run replaces the old map
        })
      );
      api.addEventListener("execution_error", clearProgress);
      api.addEventListener("execution_interrupted", clearProgress);
      api.addEventListener(
        "executing",
        guard("executing event", ({ detail }) => {
          // detail is the executing node's id, or null when the prompt is done
          if (detail == null || (typeof detail === "object" && detail.node == null)) clearProgress();
        })
      );
    } catch (err) {
      report("setup", err);
    }
    state.ready = true;
    refreshAllCaches();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    try {
      const name = nodeData?.name;
      if (name === SAMPLER) {
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
          const r = onExecuted?.apply(this, arguments);
          try {
            const stats = message?.flowcache_stats?.[0];
            if (stats) setStats(this, stats);
          } catch (err) {
            report("onExecuted", err);
          }
          return r;
        };
      }
      if (name === LOADER) {
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
          const r = onExecuted?.apply(this, arguments);
          try {
            const notes = notesFromOutput(message);
            if (notes) setLoaderNotes(this, notes);
          } catch (err) {
            report("loader onExecuted", err);
          }
          return r;
        };
      }
      if (name === SAMPLER || name === CACHE || name === LOADER) {
        // a cache node's values follow its links: cache -> sampler(s) -> model <- loader
        const onConnectionsChange = nodeType.prototype.onConnectionsChange;
        nodeType.prototype.onConnectionsChange = function () {
          const r = onConnectionsChange?.apply(this, arguments);
          try {
            requeryLater();
          } catch (err) {
            report("connections", err);
          }
          return r;
        };
      }
    } catch (err) {
      report("beforeRegisterNodeDef", err);
    }
  },

  nodeCreated(node) {
    try {
      const cls = classOf(node);
      if (cls === CACHE) {
        ensureSourceWidget(node);
        for (const name of ["method", "preset"]) chainWidgetCallback(widget(node, name), () => refreshCache(node));
        // values from a loaded workflow are applied after nodeCreated; refresh once they are in
        setTimeout(() => refreshCache(node), 0);
      } else if (cls === LOADER) {
        // picking a model asks the server again (a re-calibrated file shows its new rows), and hides the notes of
        // the last load, as do the other choices that decide what is loaded
        chainWidgetCallback(widget(node, "model_name"), () => {
          clearLoaderNotes(node);
          requeryLater();
        });
        for (const name of NOTE_KEY_WIDGETS) {
          if (name !== "model_name") chainWidgetCallback(widget(node, name), () => clearLoaderNotes(node));
        }
        // the loop decides which presets row applies: the cache nodes show the new one
        chainWidgetCallback(widget(node, "loop"), () => refreshAllCaches());
      }
    } catch (err) {
      report("nodeCreated", err);
    }
  },

  loadedGraphNode(node) {
    try {
      if (classOf(node) === CACHE) refreshCache(node);
    } catch (err) {
      report("loadedGraphNode", err);
    }
  },

  async afterConfigureGraph() {
    try {
      requeryLater();
    } catch (err) {
      report("afterConfigureGraph", err);
    }
  },
};

if (!alreadyRegistered) {
  try {
    app.registerExtension(extension);
    state.registered = import.meta.url;
  } catch (err) {
    report("registerExtension", err);
  }
}
