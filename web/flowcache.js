// FlowCache for ComfyUI: frontend extension.
//
// * FlowCache Sampler: when `preset` is slow/fast the threshold / warmup_steps / kv_budget / mix_lambda widgets
//   are locked and show the preset's values (for cache flowcache/teacache); `custom` unlocks them.
//   The values come from the server (GET /flowcache/model_presets?model_name=…, read from the chosen file's
//   headers and a calibrated .presets.json beside it, so a calibrated or renamed model shows its own numbers),
//   and until that answers or without it from flowcache_presets.json next to this file (kept equal to
//   flowcache/presets.json and the demo model's embedded presets by tests/test_workflows.py). The Python node
//   ignores these widgets for named presets, so this is display only: nothing breaks without the extension.
// * Live progress text from the `flowcache.progress` websocket event, drawn on the sampler node.
// * After a run (`executed` with output.flowcache_stats, or the `flowcache.stats` event): a per-chunk
//   compute/reuse map (chunks x steps per window), with the FLOPs speedup, FLOPs saved and peak KV size
//   (drawn by flowcache_map.js).
//
// Every hook is wrapped in try/catch: a failure here is logged once and never breaks the node or the graph.
// Debug/test hook: window.__flowcache (presets, progress, stats, drawn maps, errors) and
// document.body.dataset.flowcacheMaps (number of maps drawn so far).
import { app } from "../../scripts/app.js";
import { drawMap, mapHeight } from "./flowcache_map.js";

const EXT_NAME = "FlowCache.UI";
const SAMPLER = "FlowCacheSampler";
const LOADER = "FlowCacheModelLoader";
const DEMO_ENTRY_PREFIX = "flowcache-demo";
const LOCKABLE = { threshold: "threshold", warmup_steps: "warmup", kv_budget: "kv_budget", mix_lambda: "mix_lambda" };
const MAP_WIDGET = "flowcache_map";

const state = (window.__flowcache = window.__flowcache || {
  version: 1,
  presets: null, // flowcache_presets.json once loaded
  filePresets: {}, // model_name -> the server's answer for that file (or "pending")
  progress: {}, // node id -> last progress event
  stats: {}, // node id -> last stats dict
  drawn: {}, // node id -> {windows, chunks, steps, at} of the last map drawn
  errors: [],
});

function report(where, err) {
  try {
    const msg = `${where}: ${err && err.message ? err.message : err}`;
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

async function loadPresets() {
  try {
    const url = new URL("./flowcache_presets.json", import.meta.url);
    const resp = await fetch(url, { cache: "no-cache" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status} for ${url}`);
    state.presets = await resp.json();
  } catch (err) {
    report("loading presets", err);
  }
  refreshAllSamplers();
}

function widget(node, name) {
  return node?.widgets?.find((w) => w && w.name === name);
}

function inputLinkOrigin(node, inputName) {
  const graph = node?.graph;
  const input = node?.inputs?.find((i) => i && i.name === inputName);
  if (!graph || !input || input.link == null) return null;
  const link = graph.links?.get ? graph.links.get(input.link) : graph.links?.[input.link];
  if (!link) return null;
  return graph.getNodeById(link.origin_id) || null;
}

/** The model_name chosen on the loader feeding this sampler (null when no FlowCache loader feeds it). */
function modelNameOf(sampler) {
  const loader = inputLinkOrigin(sampler, "model");
  if (!loader || (loader.comfyClass || loader.type) !== LOADER) return null;
  return String(widget(loader, "model_name")?.value ?? "");
}

/** The server's preset rows for a file, fetched once per name; refreshes the samplers when they arrive. */
function filePresets(name) {
  const known = state.filePresets[name];
  if (known !== undefined) return known === "pending" ? null : known;
  state.filePresets[name] = "pending";
  const api = app.api;
  if (!api?.fetchApi) {
    state.filePresets[name] = null; // no API object: the static table stays in use
    return null;
  }
  api
    .fetchApi(`/flowcache/model_presets?model_name=${encodeURIComponent(name)}`, { cache: "no-cache" })
    .then((resp) => (resp.ok ? resp.json() : null))
    .then((data) => {
      state.filePresets[name] = data && data.known ? data : null;
      refreshAllSamplers();
    })
    .catch((err) => {
      state.filePresets[name] = null; // an older server without the route: the static table stays in use
      report("model presets", err);
    });
  return null;
}

/** The presets-table key of the model feeding this sampler, from the loader's file name (null if unknown). */
function modelKeyOf(sampler) {
  const name = modelNameOf(sampler);
  if (name === null) return null;
  if (name.startsWith(DEMO_ENTRY_PREFIX)) return "demo";
  const aliases = state.presets?.aliases || [];
  for (const [pattern, key] of aliases) {
    try {
      if (new RegExp(pattern, "i").test(name)) return key;
    } catch (_) {
      /* bad pattern in the json: ignore it */
    }
  }
  return null;
}

function presetValues(modelKey, cache, preset, fromFile) {
  const row = fromFile?.rows?.[cache]?.[preset];
  if (row) return { ...row };
  const table = state.presets?.models;
  const entry = table?.[modelKey]?.[cache]?.[preset];
  if (!entry) return null;
  return { ...entry, mix_lambda: state.presets?.mix_lambda ?? 0.07 };
}

function isLinked(node, w) {
  try {
    const slot = node.getSlotFromWidget?.(w);
    return slot?.link != null;
  } catch (_) {
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

/** Locked widgets are `disabled` (greyed, not clickable); litegraph hides a disabled widget's value, so show it. */
function setLocked(node, w, locked) {
  w.disabled = !!locked;
  w.__fcLocked = !!locked;
  if (locked && !w.__fcDisplayPatched) {
    const base = findGetter(w, "_displayValue");
    Object.defineProperty(w, "_displayValue", {
      configurable: true,
      get() {
        try {
          if (this.__fcLocked && !isLinked(node, this)) {
            const p = this.options?.precision;
            const v = Number(this.value);
            return Number.isFinite(v) ? v.toFixed(p !== undefined ? p : 3) : String(this.value);
          }
        } catch (_) {
          /* fall through */
        }
        return base ? base.call(this) : String(this.value);
      },
    });
    w.__fcDisplayPatched = true;
  }
}

function refreshSampler(node) {
  try {
    const cache = widget(node, "cache")?.value;
    const preset = widget(node, "preset")?.value;
    // slow/fast: the node takes these four from the preset and ignores the widgets (with cache=off nothing uses
    // them at all), so they are locked; custom unlocks them. Values are filled in when the model's row is known.
    const lock = preset === "slow" || preset === "fast";
    const name = modelNameOf(node);
    const fromFile = name ? filePresets(name) : null;
    const key = fromFile?.key || modelKeyOf(node);
    const values = lock && key && cache !== "off" ? presetValues(key, cache, preset, fromFile) : null;
    for (const [wname, field] of Object.entries(LOCKABLE)) {
      const w = widget(node, wname);
      if (!w) continue;
      if (values && values[field] !== undefined && w.value !== values[field]) {
        w.value = values[field];
      }
      setLocked(node, w, lock);
    }
    node.__fcPreset = { lock, key, cache, preset, known: !!values, source: fromFile?.rows?.[cache] ? "file" : "table" };
    node.setDirtyCanvas?.(true, false);
  } catch (err) {
    report("preset lock", err);
  }
}

function samplers() {
  const nodes = app.graph?._nodes || app.graph?.nodes || [];
  return nodes.filter((n) => (n.comfyClass || n.type) === SAMPLER);
}

function refreshAllSamplers() {
  try {
    for (const n of samplers()) refreshSampler(n);
  } catch (err) {
    report("refresh", err);
  }
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
  let w = widget(node, MAP_WIDGET);
  if (w) return w;
  w = {
    name: MAP_WIDGET,
    type: "flowcache_map",
    value: null,
    serialize: false, // never in widgets_values (kept last, so no hole either)
    options: { serialize: false }, // never in the API prompt
    draw: guard("draw map", function (ctx, n, width, y) {
      drawMapWidget(ctx, n, width, y);
    }),
    computeSize: function (width) {
      try {
        return [width ?? node.size[0], mapHeight(node.__fcInfo, width ?? node.size[0])];
      } catch (err) {
        report("map size", err);
        return [width ?? 0, 0];
      }
    },
    mouse: () => false,
  };
  node.addCustomWidget(w);
  return w;
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

// --------------------------------------------------------------------------------------------- register

// The pack's web folder can be served twice (WEB_DIRECTORY under the folder name and pyproject's [tool.comfy] web
// under the project name, when the two differ): register once.
const alreadyRegistered = (() => {
  try {
    return !!(state.registered || (app.extensions || []).some((e) => e && e.name === EXT_NAME));
  } catch (_) {
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
    loadPresets();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    try {
      if (nodeData?.name !== SAMPLER) return;
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
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const r = onConnectionsChange?.apply(this, arguments);
        try {
          const node = this;
          setTimeout(() => refreshSampler(node), 0);
        } catch (err) {
          report("connections", err);
        }
        return r;
      };
    } catch (err) {
      report("beforeRegisterNodeDef", err);
    }
  },

  nodeCreated(node) {
    try {
      const cls = node.comfyClass || node.type;
      if (cls === SAMPLER) {
        for (const name of ["cache", "preset"]) chainWidgetCallback(widget(node, name), () => refreshSampler(node));
        // values from a loaded workflow are applied after nodeCreated; refresh once they are in
        setTimeout(() => refreshSampler(node), 0);
      } else if (cls === LOADER) {
        chainWidgetCallback(widget(node, "model_name"), () => {
          state.filePresets = {}; // picking a model asks the server again: a re-calibrated file shows its new rows
          refreshAllSamplers();
        });
      }
    } catch (err) {
      report("nodeCreated", err);
    }
  },

  loadedGraphNode(node) {
    try {
      if ((node.comfyClass || node.type) === SAMPLER) refreshSampler(node);
    } catch (err) {
      report("loadedGraphNode", err);
    }
  },

  async afterConfigureGraph() {
    refreshAllSamplers();
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
