// FlowCache for ComfyUI: FlowCache Load Model's notes (what the loader decided: the sampling loop and why, which
// weights of a .pt, distilled or base MAGI-1, the layers used), drawn under its widgets after it ran.
// The loader returns {"ui": {"flowcache_notes": [...]}}; the frontend hands that to onExecuted. Pure functions
// (no DOM, no graph, no app): flowcache.js owns the widget; tests/test_web.py runs these under node.
// No side effects on import (ComfyUI loads every .js here).

import { wrapWords } from "./flowcache_map.js";

/** The loader's widgets whose values decide what it loads: a change makes the notes of the last load stale. */
export const NOTE_KEY_WIDGETS = ["model_name", "loop", "weights", "magi_variant"];
export const MAX_NOTES = 8;
export const MAX_NOTE_LINES = 12;
const PAD = 10;
const LINE = 14;
const CHAR_W = 6; // about one character of 11px sans-serif: lines are wrapped the same way when measured
const TOP = 4;
const COLORS = { title: "#8fc98f", text: "#ccc" };

/**
 * The notes of an `executed` output ({flowcache_notes: [...]}) as a clean list of strings (whitespace collapsed,
 * empty entries and non-strings dropped, at most MAX_NOTES); null when the output carries no notes at all, so a
 * message that is not the loader's leaves what is shown alone. An empty list is a real answer: nothing to say.
 */
export function notesFromOutput(output) {
  const raw = output && typeof output === "object" ? output.flowcache_notes : undefined;
  if (!Array.isArray(raw)) return null;
  return raw
    .filter((s) => typeof s === "string")
    .map((s) => s.replace(/\s+/g, " ").trim())
    .filter(Boolean)
    .slice(0, MAX_NOTES);
}

/** What identifies a load: the values of NOTE_KEY_WIDGETS ({name: value}); missing widgets count as null. */
export function notesKey(values) {
  const v = values && typeof values === "object" ? values : {};
  return JSON.stringify(NOTE_KEY_WIDGETS.map((k) => (v[k] === undefined ? null : v[k])));
}

/** The notes to show: those recorded for ``key`` (entry = {key, notes}), [] when they belong to another load. */
export function visibleNotes(entry, key) {
  if (!entry || typeof entry !== "object" || !Array.isArray(entry.notes)) return [];
  return entry.key === key ? entry.notes : [];
}

/**
 * The lines drawn for ``notes`` at ``width``: a title line, then each note as a bullet with its continuation
 * lines indented; at most MAX_NOTE_LINES, the last one then says how many notes are left out. [] for no notes.
 */
export function noteLayout(notes, width) {
  const list = Array.isArray(notes) ? notes.filter((s) => typeof s === "string" && s) : [];
  if (!list.length) return [];
  const per = Math.max(12, Math.floor((Math.max(60, Number(width) || 0) - 2 * PAD) / CHAR_W) - 2);
  const lines = [{ text: "Loaded:", title: true }];
  for (let i = 0; i < list.length; i++) {
    const wrapped = wrapWords(list[i], per);
    if (lines.length + wrapped.length > MAX_NOTE_LINES) {
      const left = list.length - i;
      lines.length = Math.min(lines.length, MAX_NOTE_LINES - 1);
      lines.push({ text: `(${left} more note${left > 1 ? "s" : ""} in the log)`, title: false, indent: true });
      break;
    }
    wrapped.forEach((text, k) => lines.push({ text: k ? text : `• ${text}`, title: false, indent: k > 0 }));
  }
  return lines;
}

/** Height the notes need at ``width`` (0 for none: the node keeps its size). */
export function notesHeight(notes, width) {
  const n = noteLayout(notes, width).length;
  return n ? TOP + n * LINE + 4 : 0;
}

/** Draws the notes at ``y``; returns the number of lines drawn. */
export function drawNotes(ctx, notes, width, y) {
  const lines = noteLayout(notes, width);
  if (!lines.length) return 0;
  ctx.save();
  try {
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    let yy = y + TOP;
    for (const line of lines) {
      ctx.fillStyle = line.title ? COLORS.title : COLORS.text;
      ctx.fillText(line.text, PAD + (line.indent ? 10 : 0), yy);
      yy += LINE;
    }
  } finally {
    ctx.restore();
  }
  return lines.length;
}
