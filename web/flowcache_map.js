// FlowCache for ComfyUI: the sampler's progress bar and per-chunk compute/reuse map, drawn on a canvas.
// Pure drawing from the run's stats (RunStats.to_dict: maps, flops, flops_nocache, kv_peak_bytes, …); imported by
// flowcache.js, which owns the widget and the page state. No side effects on import (ComfyUI loads every .js here).

const COLORS = { computed: "#e8893a", reused: "#3bb273", empty: "#2a2a2a", prefix: "#444c56", text: "#ddd", dim: "#999",
  note: "#e0a040", switch: "#4aa3ff" };

// ------------------------------------------------------------------------------------------- formatting

function fmtFlops(x) {
  const units = [["P", 1e15], ["T", 1e12], ["G", 1e9], ["M", 1e6]];
  for (const [u, v] of units) if (Math.abs(x) >= v) return `${(x / v).toFixed(x / v >= 100 ? 0 : 2)} ${u}FLOPs`;
  return `${Math.round(x)} FLOPs`;
}

function fmtBytes(b) {
  if (!b) return "0 B";
  const units = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [u, v] of units) if (b >= v) return `${(b / v).toFixed(b / v >= 100 ? 0 : 1)} ${u}`;
  return `${b} B`;
}

function summaryLines(stats) {
  const speed = Number(stats.flops_speedup || 1);
  const saved = Math.max(0, Number(stats.flops_nocache || 0) - Number(stats.flops || 0));
  const pct = stats.flops_nocache ? (100 * saved) / stats.flops_nocache : 0;
  const mode = stats.mode || stats.settings?.mode || "";
  const line1 = `${speed.toFixed(2)}x fewer FLOPs · saved ${fmtFlops(saved)} (${pct.toFixed(0)}%)`;
  const kv = stats.kv_peak_bytes ? `peak KV ${fmtBytes(stats.kv_peak_bytes)}` : "peak KV —";
  const secs = stats.wall_seconds ? ` · ${Number(stats.wall_seconds).toFixed(1)} s` : "";
  const line2 = `${mode} · computed ${stats.computed ?? 0} / reused ${stats.reused ?? 0} · ${kv}${secs}`;
  const plan = memoryLine(stats);
  return plan ? [line1, line2, plan] : [line1, line2];
}

/** The memory plan the sampler chose (stats.memory_plan), e.g. "memory: offload + fp8 K/V · 5.3 GiB on the device
 * beside the weights · 9.0 GiB in RAM"; "" when the run did not say. */
export function memoryLine(stats) {
  const plan = stats && stats.memory_plan;
  if (!plan || typeof plan.plan !== "string") return "";
  const host = plan.host_bytes ? ` · ${fmtBytes(plan.host_bytes)} in RAM` : "";
  return `memory: ${plan.plan} · ${fmtBytes(plan.device_bytes || 0)} on the device beside the weights${host}`;
}

// --------------------------------------------------------------------------------------------- the map

const PAD = 10;
const LINE = 14;
const MAX_MAP_H = 260;
const NOTE_CHAR_W = 6; // about one character of 11px sans-serif: the note is wrapped the same way when measured
const NOTE_MAX_LINES = 3;

/** The run's note (stats.note, e.g. "no cache node connected: ..."), wrapped to ``width``; [] when there is none. */
/** ``text`` in lines of at most ``per`` characters, broken between words (a longer word is cut with "..."). */
export function wrapWords(text, per) {
  const lines = [];
  let line = "";
  for (const word of String(text).split(/\s+/)) {
    if (!word) continue;
    const next = line ? `${line} ${word}` : word;
    if (next.length <= per) {
      line = next;
      continue;
    }
    if (line) lines.push(line);
    line = word.length > per ? word.slice(0, per - 3) + "..." : word;
  }
  if (line) lines.push(line);
  return lines;
}

export function noteLines(stats, width) {
  const note = stats && typeof stats.note === "string" ? stats.note.trim() : "";
  if (!note) return [];
  const per = Math.max(12, Math.floor((Math.max(40, width) - 2 * PAD) / NOTE_CHAR_W));
  const lines = wrapWords(note, per);
  if (lines.length > NOTE_MAX_LINES) {
    lines.length = NOTE_MAX_LINES;
    lines[NOTE_MAX_LINES - 1] = lines[NOTE_MAX_LINES - 1].slice(0, per - 3) + "...";
  }
  return lines;
}

/** Grid of windows: picks how many windows per row so cells stay readable and the map stays short. */
function layoutMap(maps, width) {
  const windows = (maps || []).map((chunks) => (chunks || []).map((s) => String(s || "")));
  const n = windows.length;
  if (!n) return null;
  const cols = Math.max(1, ...windows.map((w) => Math.max(1, ...w.map((s) => s.length))));
  const rows = Math.max(1, ...windows.map((w) => w.length));
  const avail = Math.max(40, width - 2 * PAD);
  const gap = 6;
  const labelH = 11;
  let best = null;
  for (let per = 1; per <= n; per++) {
    const cellW = (avail - (per - 1) * gap) / (per * cols);
    if (cellW < 1 && best) break;
    const cellH = Math.max(3, Math.min(10, cellW * 1.5));
    const lines = Math.ceil(n / per);
    const height = lines * (labelH + rows * cellH + gap);
    const cand = { per, cellW, cellH, lines, height, cols, rows, gap, labelH, windows };
    if (!best || (best.height > MAX_MAP_H && height < best.height)) best = cand;
    if (height <= MAX_MAP_H) break;
  }
  return best;
}

/** Height the progress bar, summary and map of ``info`` ({progress, stats}) need at ``width``. */
export function mapHeight(info, width) {
  if (!info) return 0;
  let h = 6;
  if (info.progress) h += LINE + 8;
  if (info.stats) {
    const lay = layoutMap(info.stats.maps, width);
    h += noteLines(info.stats, width).length * LINE;
    h += (summaryLines(info.stats).length + 1) * LINE; // the summary lines + legend
    if (lay) h += Math.min(lay.height, MAX_MAP_H + 40) + 4;
  }
  return h;
}

/** Draws ``info`` ({progress, stats}) at ``y``; returns what the map showed ({windows, chunks, steps, note}) or null. */
export function drawMap(ctx, info, width, y) {
  if (!info) return null;
  ctx.save();
  try {
    let yy = y + 4;
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    if (info.progress) {
      const p = info.progress;
      const frac = p.max ? Math.min(1, Math.max(0, p.value / p.max)) : 0;
      ctx.fillStyle = "#1c1c1c";
      ctx.fillRect(PAD, yy, width - 2 * PAD, LINE + 4);
      ctx.fillStyle = "#2f5f8a";
      ctx.fillRect(PAD, yy, (width - 2 * PAD) * frac, LINE + 4);
      ctx.fillStyle = COLORS.text;
      ctx.fillText(String(p.text ?? `${p.value}/${p.max}`), PAD + 4, yy + 3);
      yy += LINE + 8;
    }
    const stats = info.stats;
    if (!stats) return null;
    const note = noteLines(stats, width);
    ctx.fillStyle = COLORS.note;
    for (const line of note) {
      ctx.fillText(line, PAD, yy);
      yy += LINE;
    }
    const [l1, ...rest] = summaryLines(stats);
    ctx.fillStyle = COLORS.text;
    ctx.font = "bold 11px sans-serif";
    ctx.fillText(l1, PAD, yy);
    yy += LINE;
    ctx.font = "11px sans-serif";
    ctx.fillStyle = COLORS.dim;
    for (const line of rest) {
      ctx.fillText(line, PAD, yy);
      yy += LINE;
    }
    // legend
    const legend = [["computed", COLORS.computed], ["reused", COLORS.reused]];
    if ((stats.maps || []).some((w) => (w || []).some((c) => !c) && (w || []).slice(1).some((c) => c))) {
      legend.push(["overlap", COLORS.prefix]); // carried-over frames of a later window: never sampled, no decisions
    }
    let lx = PAD;
    for (const [label, color] of legend) {
      ctx.fillStyle = color;
      ctx.fillRect(lx, yy + 2, 9, 9);
      ctx.fillStyle = COLORS.dim;
      ctx.fillText(label, lx + 12, yy);
      lx += 14 + ctx.measureText(label).width + 10;
    }
    ctx.fillText("rows: chunks · columns: steps", lx, yy);
    yy += LINE;
    const lay = layoutMap(stats.maps, width);
    if (!lay) return null;
    const { per, cellW, cellH, cols, rows, gap, labelH, windows } = lay;
    const blockW = cols * cellW;
    const blockH = labelH + rows * cellH + gap;
    const origin = (wi) => [PAD + (wi % per) * (blockW + gap), yy + Math.floor(wi / per) * blockH];
    if ((stats.switches || []).length) {
      ctx.fillStyle = COLORS.dim;
      ctx.font = "9px sans-serif";
      ctx.fillText("▸ prompt change", width - PAD - ctx.measureText("▸ prompt change").width, yy - LINE);
    }
    windows.forEach((chunks, wi) => {
      const bx = PAD + (wi % per) * (blockW + gap);
      const by = yy + Math.floor(wi / per) * blockH;
      if (by - yy > MAX_MAP_H + 30) return; // very long runs: clip
      ctx.fillStyle = COLORS.dim;
      ctx.font = "9px sans-serif";
      const single = chunks.length > 0 && chunks.slice(1).every((s) => !s);
      ctx.fillText(`window ${wi + 1}${single && chunks.length > 1 ? " (whole window)" : ""}`, bx, by);
      for (let r = 0; r < chunks.length; r++) {
        const s = chunks[r];
        const ry = by + labelH + r * cellH;
        if (!s) {
          ctx.fillStyle = COLORS.prefix; // overlap prefix / not cached: no decisions
          ctx.fillRect(bx, ry, blockW, Math.max(1, cellH - 1));
          continue;
        }
        ctx.fillStyle = COLORS.empty;
        ctx.fillRect(bx, ry, blockW, Math.max(1, cellH - 1));
        // runs of equal cells in one fillRect each
        let start = 0;
        for (let c = 1; c <= s.length; c++) {
          if (c === s.length || s[c] !== s[start]) {
            ctx.fillStyle = s[start] === "R" ? COLORS.reused : s[start] === "C" ? COLORS.computed : COLORS.empty;
            const x0 = bx + start * cellW;
            const w = Math.max(1, (c - start) * cellW - (cellW >= 4 ? 1 : 0));
            ctx.fillRect(x0, ry, w, Math.max(1, cellH - 1));
            start = c;
          }
        }
      }
    });
    // prompt changes (RunStats.switches): a line above the block or chunk where one takes effect, or above the
    // window that reads it (diffusion forcing: rule "window"), with the entry's number
    let marked = 0;
    for (const sw of stats.switches || []) {
      const perWindow = sw.rule === "window";
      const wi = perWindow ? sw.chunk : 0;
      const row = perWindow ? 0 : sw.chunk;
      if (wi >= windows.length || row >= rows) continue;
      const [bx, by] = origin(wi);
      if (by - yy > MAX_MAP_H + 30) continue;
      const ry = by + labelH + row * cellH;
      ctx.fillStyle = COLORS.switch;
      ctx.fillRect(bx - 3, ry - 1, blockW + 3, 2);
      ctx.fillRect(bx - 3, ry - 1, 2, Math.max(3, cellH));
      ctx.font = "9px sans-serif";
      ctx.fillText(`▸${sw.entry}`, bx + blockW + 2, ry - 4);
      marked++;
    }
    return { windows: windows.length, chunks: rows, steps: cols, note: note.join(" "), switches: marked };
  } finally {
    ctx.restore();
  }
}
