// FlowCache for ComfyUI: the preset lock of FlowCache Cache, as pure functions (no DOM, no graph, no app).
// flowcache.js walks the graph, asks the server (GET /flowcache/model_presets) and applies the plan computed here;
// tests/test_web.py runs these functions under node. No side effects on import (ComfyUI loads every .js here).
//
// A route answer is {"model_name", "family", "key", "known": true, "rows": {method: {slow: {...}, fast: {...},
// turbo: {...}}}} (a model may lack a method's row, turbo most often)
// (each row: threshold, warmup, kv_budget, mix_lambda, and any field a future method adds), or
// {"known": false, "rows": {}, "error" | "hint": ...}.

/** The cache node's widgets that are not knobs (attention, reuse and cfg_reuse: "auto" follows the model's presets;
 * kv_placement and kv_dtype choose the memory plan, whatever the method and preset; cfg_interval goes with
 * cfg_reuse: all stay free). */
export const CONTROL_WIDGETS = ["method", "preset", "attention", "reuse", "kv_placement", "kv_dtype", "cfg_reuse",
  "cfg_interval"];
/** The presets whose knobs come from the model (locked); the node's preset list (flowcache/presets.py PRESET_NAMES)
 * less custom. */
export const NAMED_PRESETS = ["slow", "fast", "turbo"];
/** Preset row field -> widget name, where the two differ; any other field is shown on the widget of its own name. */
export const FIELD_WIDGETS = { threshold: "threshold", warmup: "warmup_steps", kv_budget: "kv_budget", mix_lambda: "mix_lambda" };

export function widgetForField(field) {
  return Object.prototype.hasOwnProperty.call(FIELD_WIDGETS, field) ? FIELD_WIDGETS[field] : String(field);
}

export function fieldForWidget(name) {
  for (const [field, widget] of Object.entries(FIELD_WIDGETS)) if (widget === name) return field;
  return String(name);
}

/** Knob widgets of a cache node: every widget the node defines except method and preset. */
export function knobNames(widgetNames) {
  return (widgetNames || []).filter((n) => typeof n === "string" && n && !CONTROL_WIDGETS.includes(n));
}

/**
 * The one model a cache node's settings apply to, from the model_name of each sampler its output feeds
 * (null for a sampler whose model does not come from a FlowCache loader).
 * Returns {name, reason}: reason is null when name is known, else "unlinked" (no sampler), "no-loader",
 * or "several" (samplers with different models).
 */
export function chooseModel(names) {
  const list = Array.isArray(names) ? names : [];
  if (!list.length) return { name: null, reason: "unlinked" };
  if (list.some((n) => typeof n !== "string" || !n)) return { name: null, reason: "no-loader" };
  if (new Set(list).size > 1) return { name: null, reason: "several" };
  return { name: list[0], reason: null };
}

const REASONS = {
  unlinked: "no sampler connected",
  "no-loader": "no FlowCache loader",
  several: "samplers with different models",
};

function shortName(name) {
  const s = String(name || "").split("\u0001")[0]; // the file name, without the loader's loop choice
  const base = s.split(/[\\/]/).pop() || s;
  return base.length > 40 ? base.slice(0, 37) + "..." : base;
}

/**
 * What to lock and show on a cache node.
 *   method, preset: the node's combo values
 *   knobs: its knob widget names (knobNames)
 *   model: chooseModel(...) for the node
 *   answer: the route's answer for model.name, "pending" while it is being asked, or null (no answer / failed)
 * Returns {mode, source, known, key, text, widgets: {name: {locked, shown, value?}}} where shown is
 *   "value"   the widget shows a number (value, when given, is what the run will use: set it on the widget)
 *   "model"   locked, the value comes from the model at run time (unknown here: no number is shown)
 *   "pending" locked, the server is being asked
 *   "unused"  locked, nothing reads this widget (method off, or a field the chosen method does not have)
 * and source is "off", "custom", "server", "pending", "missing" (the model has no such preset) or "model".
 */
export function lockPlan({ method, preset, knobs, model, answer } = {}) {
  const names = knobNames(knobs);
  const all = (entry) => Object.fromEntries(names.map((n) => [n, { ...entry }]));
  const m = model && typeof model === "object" ? model : { name: null, reason: "unlinked" };
  if (method === "off") {
    return { mode: "off", source: "off", known: false, key: null, widgets: all({ locked: true, shown: "unused" }),
      text: "off: every step computed; these values are not used" };
  }
  if (!NAMED_PRESETS.includes(preset)) {
    return { mode: "custom", source: "custom", known: false, key: null, widgets: all({ locked: false, shown: "value" }),
      text: "custom: the values below are used" };
  }
  const base = { mode: "named", known: false, key: null };
  if (m.name && answer === "pending") {
    return { ...base, source: "pending", widgets: all({ locked: true, shown: "pending" }),
      text: `${preset}: asking the server for the model's presets...` };
  }
  const ans = answer && typeof answer === "object" ? answer : null;
  if (m.name && ans && ans.known) {
    const row = ans.rows && ans.rows[method] && ans.rows[method][preset];
    const key = ans.key != null ? String(ans.key) : null;
    if (row && typeof row === "object") {
      const widgets = {};
      for (const n of names) {
        const v = row[fieldForWidget(n)];
        widgets[n] = typeof v === "number" && Number.isFinite(v)
          ? { locked: true, shown: "value", value: v }
          : { locked: true, shown: "unused" };
      }
      return { ...base, source: "server", known: true, key, widgets,
        text: `${preset} preset of ${key || shortName(m.name)}, read from the model file${autoChoices(row)}` };
    }
    // the rows it has instead (a model calibrated for slow/fast but not turbo has two)
    const mine = (ans.rows && ans.rows[method]) || {};
    const have = NAMED_PRESETS.filter((n) => mine[n] && typeof mine[n] === "object");
    const pick = have.length ? `pick ${have.join(", ")} or custom` : "pick custom";
    return { ...base, source: "missing", key, widgets: all({ locked: true, shown: "model" }),
      text: `${key || shortName(m.name)} has no ${method} ${preset} preset: ${pick}` };
  }
  let why = REASONS[m.reason] || "no model";
  if (m.name) {
    const msg = ans ? String(ans.error || ans.hint || "") : "";
    why = !ans ? "no answer from the server" : /not found/i.test(msg) ? "file not found" : "unknown to the server";
  }
  return { ...base, source: "model", widgets: all({ locked: true, shown: "model" }),
    text: `${preset}: from the model at run time (${why})` };
}

/** What "auto" on the attention and reuse widgets resolves to for a row, as a note ("" if the row names neither). */
export function autoChoices(row) {
  const said = [];
  if (row && typeof row.attention === "string") said.push(`${row.attention} attention`);
  if (row && typeof row.reuse === "string") said.push(`${row.reuse} reuse`);
  return said.length ? ` (auto: ${said.join(", ")})` : "";
}

/** The text a locked widget shows for a plan entry (null: let the widget draw its own value). */
export function shownText(entry, value, precision) {
  if (!entry || !entry.locked) return null;
  switch (entry.shown) {
    case "model":
      return "from model";
    case "pending":
      return "...";
    case "unused":
      return "unused";
    default: {
      const v = Number(value);
      if (!Number.isFinite(v)) return String(value);
      const p = Number.isInteger(precision) && precision >= 0 && precision <= 10 ? precision : 3;
      return v.toFixed(p);
    }
  }
}
