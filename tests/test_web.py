"""The web extension (``web/*.js``): static checks, and its pure modules run under ``node`` when it is installed:
the preset lock (``flowcache_presets.js``), the map's note wrapping (``flowcache_map.js``), the loader notes
(``flowcache_notes.js``), and ``flowcache.js`` evaluated as an ES module against a stub app.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"


def test_web_extension_static_checks():
    """Rules of the files themselves (where the app module is, buttons never serialized, no static preset table);
    what the extension does is run under node below."""
    js = (WEB / "flowcache.js").read_text(encoding="utf-8")
    # files directly in web/ are served at /extensions/<pack>/x.js: the app module is two levels up
    assert 'from "../../scripts/app.js"' in js
    assert "scripts/api.js" not in js, "use app.api (comfyui-host.md)"
    for m in re.finditer(r"addWidget\(\s*[\"']button[\"'][^;]*;", js):
        assert "serialize: false" in m.group(0) or "serialize:false" in m.group(0), m.group(0)
    # the frontend's preset tables come from the server only: no static table, no file-name aliases
    assert not (WEB / "flowcache_presets.json").exists()
    for f in WEB.glob("*.js"):
        text = f.read_text(encoding="utf-8")
        assert "flowcache_presets.json" not in text and "aliases" not in text and "wan-1.3B" not in text, f.name
    assert not [p for p in WEB.rglob("*") if p.is_file() and p.suffix not in (".js", ".css", ".md")
                and p.name != ".gitkeep"]


def test_web_named_presets_are_the_cores():
    """The presets the frontend locks are the named presets of the core (the node's preset list less custom):
    a preset added to one and not the other would be shown unlocked, or locked with nothing to show."""
    from flowcache.presets import NAMED_PRESETS, PRESET_NAMES

    js = (WEB / "flowcache_presets.js").read_text(encoding="utf-8")
    found = re.search(r"export const NAMED_PRESETS = (\[[^\]]*\]);", js)
    assert found, "flowcache_presets.js: NAMED_PRESETS not found"
    assert json.loads(found.group(1)) == list(NAMED_PRESETS) == [p for p in PRESET_NAMES if p != "custom"]
    assert "turbo" in NAMED_PRESETS


def _node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    return node


def _run_mjs(node: str, script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60)


# Assertions in JS: check(cond, what) collects failures; the script exits 1 listing them, or prints "ok <n>".
JS_CHECK = """
const failures = [];
let checks = 0;
const show = (v) => JSON.stringify(v);
function check(cond, what, got) { checks++; if (!cond) failures.push(what + (got === undefined ? '' : ' (got ' + show(got) + ')')); }
function done() {
  if (failures.length) { console.log('FAILED\\n' + failures.join('\\n')); process.exit(1); }
  console.log('ok ' + checks);
}
"""


def test_preset_lock_rules_in_node(tmp_path):
    """web/flowcache_presets.js (the lock rules) and the map's note wrapping, run by node."""
    node = _node_or_skip()
    script = tmp_path / "presets_test.mjs"
    script.write_text(JS_CHECK + f"""
const P = await import({json.dumps((WEB / "flowcache_presets.js").as_uri())});
const M = await import({json.dumps((WEB / "flowcache_map.js").as_uri())});
const KNOBS = ['threshold', 'warmup_steps', 'kv_budget', 'mix_lambda'];
const WIDGETS = ['method', 'preset', ...KNOBS];
const ROW = (t, w, kv) => ({{ threshold: t, warmup: w, kv_budget: kv, mix_lambda: 0.07 }});
// flowcache fast carries a field with no widget (attention): ignored
const ANSWER = {{ model_name: 'my.safetensors', family: 'wan', key: 'my-key', known: true, rows: {{
  flowcache: {{ slow: ROW(0.1, 5, 0), fast: {{ ...ROW(0.123, 2, 1), attention: 'block_causal' }} }}, teacache: {{ slow: ROW(0.1, 5, 0), fast: ROW(0.2, 5, 0) }},
  magcache: {{ slow: {{ magcache_k: 4, threshold: 0.06 }} }} }} }};
const MODEL = {{ name: 'my.safetensors', reason: null }};
const plan = (method, preset, answer, model = MODEL, knobs = WIDGETS) => P.lockPlan({{ method, preset, knobs, model, answer }});
const values = (p) => Object.fromEntries(Object.entries(p.widgets).map(([k, e]) => [k, e.value]));
const locked = (p) => Object.values(p.widgets).map((e) => e.locked);

// field <-> widget names: the four known ones, any other field on the widget of its own name
check(P.widgetForField('warmup') === 'warmup_steps' && P.widgetForField('threshold') === 'threshold', 'widgetForField');
check(P.widgetForField('magcache_k') === 'magcache_k' && P.fieldForWidget('warmup_steps') === 'warmup'
  && P.fieldForWidget('magcache_k') === 'magcache_k', 'fields of other methods');
check(show(P.knobNames(WIDGETS)) === show(KNOBS), 'knobNames', P.knobNames(WIDGETS));
// the memory plan's widgets are read whatever the method and preset (method off included): never locked
check(show(P.knobNames([...WIDGETS, 'attention', 'reuse', 'kv_placement', 'kv_dtype'])) === show(KNOBS), 'free widgets');
check(!('kv_placement' in plan('off', 'slow', ANSWER, MODEL, [...WIDGETS, 'kv_placement', 'kv_dtype']).widgets), 'off frees kv');

// which model: one sampler, several with the same model, different models, no loader, no sampler
check(show(P.chooseModel(['a'])) === show({{ name: 'a', reason: null }}), 'one model');
check(P.chooseModel(['a', 'a']).name === 'a', 'same model twice');
check(show(P.chooseModel(['a', 'b'])) === show({{ name: null, reason: 'several' }}), 'different models');
check(P.chooseModel(['a', null]).reason === 'no-loader' && P.chooseModel([]).reason === 'unlinked', 'no chain');

// named preset with the server's row: locked, the row's values (warmup -> warmup_steps)
let p = plan('flowcache', 'fast', ANSWER);
check(p.source === 'server' && p.known && p.key === 'my-key', 'server source', p);
check(show(values(p)) === show({{ threshold: 0.123, warmup_steps: 2, kv_budget: 1, mix_lambda: 0.07 }}), 'fast values', values(p));
check(locked(p).every(Boolean) && !('method' in p.widgets) && !('preset' in p.widgets), 'all knobs locked, combos not', p.widgets);
check(plan('flowcache', 'slow', ANSWER).widgets.threshold.value === 0.1, 'slow threshold');
// what "auto" resolves to, from the row's words (a row without them says nothing)
check(/\\(auto: block_causal attention\\)$/.test(plan('flowcache', 'fast', ANSWER).text), 'auto attention', plan('flowcache', 'fast', ANSWER).text);
check(P.autoChoices({{ attention: 'window', reuse: 'extrapolate' }}) === ' (auto: window attention, extrapolate reuse)', 'auto both');
check(!/auto/.test(plan('flowcache', 'slow', ANSWER).text), 'no words, no note', plan('flowcache', 'slow', ANSWER).text);
check(plan('teacache', 'fast', ANSWER).widgets.threshold.value === 0.2, 'teacache fast threshold');
// a later method's own knob: shown from its row; knobs its row lacks are locked and unused
const more = [...WIDGETS, 'magcache_k'];
p = plan('magcache', 'slow', ANSWER, MODEL, more);
check(p.widgets.magcache_k.value === 4 && p.widgets.threshold.value === 0.06, 'magcache row', p.widgets);
check(p.widgets.kv_budget.shown === 'unused' && p.widgets.kv_budget.locked && p.widgets.kv_budget.value === undefined,
  'field not in the row', p.widgets.kv_budget);
check(plan('flowcache', 'fast', ANSWER, MODEL, more).widgets.magcache_k.shown === 'unused', 'other method knob unused');

// no numbers unless the server gave them: unknown file, no answer, pending, no chain, several models
for (const [what, answer, model] of [
  ['unknown file', {{ known: false, rows: {{}}, error: 'not found' }}, MODEL],
  ['no answer', null, MODEL],
  ['no sampler', ANSWER, {{ name: null, reason: 'unlinked' }}],
  ['several models', ANSWER, {{ name: null, reason: 'several' }}],
  ['no loader', ANSWER, {{ name: null, reason: 'no-loader' }}],
]) {{
  p = plan('flowcache', 'slow', answer, model);
  check(p.source === 'model' && !p.known && locked(p).every(Boolean), what + ': locked, from the model', p);
  check(Object.values(p.widgets).every((e) => e.value === undefined && e.shown === 'model'), what + ': no values', p.widgets);
  check(/run time/.test(p.text), what + ': says the model decides at run time', p.text);
}}
check(/different models/.test(plan('flowcache', 'fast', ANSWER, {{ name: null, reason: 'several' }}).text), 'several: text');
check(/file not found/.test(plan('flowcache', 'fast', {{ known: false, rows: {{}}, error: 'x.safetensors not found in models/diffusion_models' }}).text), 'missing file: text');
p = plan('flowcache', 'fast', 'pending');
check(p.source === 'pending' && Object.values(p.widgets).every((e) => e.locked && e.shown === 'pending' && e.value === undefined), 'pending', p);
p = plan('teacache', 'fast', {{ known: true, key: 'k', rows: {{ flowcache: ANSWER.rows.flowcache }} }});
check(p.source === 'missing' && locked(p).every(Boolean) && /custom/.test(p.text), 'no such preset for the model', p);
// turbo is a named preset: locked to its row where the model has one; where it has not, the rows it has are named
p = plan('flowcache', 'turbo', {{ ...ANSWER, rows: {{ ...ANSWER.rows, flowcache: {{ ...ANSWER.rows.flowcache, turbo: ROW(0.45, 2, 0) }} }} }});
check(p.source === 'server' && locked(p).every(Boolean) && p.widgets.threshold.value === 0.45
  && p.widgets.warmup_steps.value === 2 && /^turbo preset of my-key/.test(p.text), 'turbo row locked', p);
p = plan('flowcache', 'turbo', ANSWER);
check(p.source === 'missing' && locked(p).every(Boolean) && Object.values(p.widgets).every((e) => e.value === undefined)
  && p.text === 'my-key has no flowcache turbo preset: pick slow, fast or custom', 'no turbo row', p);

// custom unlocks, off locks everything (nothing reads them), whatever the answer
p = plan('flowcache', 'custom', ANSWER);
check(p.source === 'custom' && locked(p).every((l) => !l) && Object.values(p.widgets).every((e) => e.value === undefined), 'custom', p);
for (const preset of ['slow', 'fast', 'turbo', 'custom']) {{
  p = plan('off', preset, ANSWER);
  check(p.source === 'off' && locked(p).every(Boolean) && Object.values(p.widgets).every((e) => e.shown === 'unused'), 'off ' + preset, p);
}}

// what a locked widget shows
check(P.shownText({{ locked: true, shown: 'value' }}, 0.15, 3) === '0.150', 'number', P.shownText({{ locked: true, shown: 'value' }}, 0.15, 3));
check(P.shownText({{ locked: true, shown: 'value' }}, 5, 0) === '5', 'int');
check(P.shownText({{ locked: true, shown: 'value' }}, 0.07, undefined) === '0.070', 'default precision');
check(P.shownText({{ locked: true, shown: 'model' }}, 0.15, 3) === 'from model', 'from model');
check(P.shownText({{ locked: true, shown: 'unused' }}, 0.15, 3) === 'unused', 'unused');
check(P.shownText({{ locked: false, shown: 'value' }}, 0.15, 3) === null, 'unlocked: the widget draws itself');

// the sampler's note after a run: wrapped, none when empty
check(M.noteLines({{ note: '' }}, 300).length === 0 && M.noteLines({{}}, 300).length === 0, 'no note');
const lines = M.noteLines({{ note: "no cache node connected: FlowCache, the model's slow preset" }}, 200);
check(lines.length >= 2 && lines.join(' ') === "no cache node connected: FlowCache, the model's slow preset", 'note wrapped', lines);
check(M.mapHeight({{ stats: {{ maps: [['CR']], note: 'x' }} }}, 300) > M.mapHeight({{ stats: {{ maps: [['CR']], note: '' }} }}, 300), 'note height');

// the memory plan the sampler chose: one more line, with the host share only when offloaded
const memPlan = {{ plan: 'offload + fp8 K/V', device_bytes: 5 * 2 ** 30, host_bytes: 9 * 2 ** 30 }};
check(M.memoryLine({{ memory_plan: memPlan }}) === 'memory: offload + fp8 K/V · 5.0 GiB on the device beside the weights · 9.0 GiB in RAM', 'memory line', M.memoryLine({{ memory_plan: memPlan }}));
check(M.memoryLine({{ memory_plan: {{ plan: 'resident', device_bytes: 2 ** 20, host_bytes: 0 }} }}) === 'memory: resident · 1.0 MiB on the device beside the weights', 'resident line', M.memoryLine({{ memory_plan: {{ plan: 'resident', device_bytes: 2 ** 20, host_bytes: 0 }} }}));
check(M.memoryLine({{}}) === '', 'no plan');
check(M.mapHeight({{ stats: {{ maps: [['CR']], memory_plan: memPlan }} }}, 300) > M.mapHeight({{ stats: {{ maps: [['CR']] }} }}, 300), 'plan height');
done();
""", encoding="utf-8")
    r = _run_mjs(node, script)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stdout + r.stderr


def test_loader_notes_rules_in_node(tmp_path):
    """web/flowcache_notes.js: the loader's notes from its executed output, when they still apply, and their
    wrapping, run by node."""
    node = _node_or_skip()
    script = tmp_path / "notes_test.mjs"
    script.write_text(JS_CHECK + f"""
const N = await import({json.dumps((WEB / "flowcache_notes.js").as_uri())});
// what the loader returns: {{"ui": {{"flowcache_notes": [...]}}}}; the frontend passes the ui dict to onExecuted
const out = {{ flowcache_notes: ["causal loop (chosen on the loader)", "  layers:   comfy ops  ", "", 3, null] }};
check(show(N.notesFromOutput(out)) === show(["causal loop (chosen on the loader)", "layers: comfy ops"]), 'cleaned', N.notesFromOutput(out));
check(N.notesFromOutput({{ images: [] }}) === null && N.notesFromOutput(null) === null
  && N.notesFromOutput({{ flowcache_notes: 'x' }}) === null, 'no notes in the output: null (keep what is shown)');
check(show(N.notesFromOutput({{ flowcache_notes: [] }})) === '[]', 'an empty list is an answer');
check(N.notesFromOutput({{ flowcache_notes: Array.from({{ length: 20 }}, (_, i) => 'n' + i) }}).length === N.MAX_NOTES, 'capped');

// the notes belong to one load: model_name, loop, weights, magi_variant
const k1 = N.notesKey({{ model_name: 'a.pt', dtype: 'auto', loop: 'causal', weights: 'generator_ema', magi_variant: 'auto' }});
check(k1 === N.notesKey({{ model_name: 'a.pt', dtype: 'fp32', loop: 'causal', weights: 'generator_ema', magi_variant: 'auto' }}), 'dtype is not part of the key');
for (const [w, v] of [['model_name', 'b.pt'], ['loop', 'auto'], ['weights', 'generator'], ['magi_variant', 'distill']]) {{
  const other = N.notesKey({{ model_name: 'a.pt', loop: 'causal', weights: 'generator_ema', magi_variant: 'auto', [w]: v }});
  check(other !== k1, 'a change of ' + w + ' changes the key');
}}
check(N.notesKey({{ model_name: 'a' }}) === N.notesKey({{ model_name: 'a', loop: undefined }}), 'missing widgets (older nodes)');
const entry = {{ key: k1, notes: ['causal loop (chosen on the loader)'] }};
check(show(N.visibleNotes(entry, k1)) === show(entry.notes), 'same load: shown');
check(N.visibleNotes(entry, N.notesKey({{ model_name: 'b.pt' }})).length === 0, 'another model: hidden');
check(N.visibleNotes(null, k1).length === 0 && N.visibleNotes({{ key: k1 }}, k1).length === 0, 'nothing recorded');

// layout: a title line, bullets, continuation lines indented, capped with a line saying how many are left out
check(N.noteLayout([], 300).length === 0 && N.notesHeight([], 300) === 0, 'no notes: no lines, no height');
let lay = N.noteLayout(['causal loop (chosen on the loader)'], 400);
check(lay.length === 2 && lay[0].title && lay[1].text === '• causal loop (chosen on the loader)' && !lay[1].indent, 'one note', lay);
const long = 'diffusion forcing loop (a Wan2.1 / SkyReels-V2 DiT with nothing marking it causal)';
lay = N.noteLayout([long], 200);
check(lay.length > 2 && lay.slice(2).every((l) => l.indent) && lay.slice(1).map((l) => l.text).join(' ') === '• ' + long, 'wrapped', lay);
check(N.notesHeight([long], 200) > N.notesHeight([long], 600), 'narrower: taller');
lay = N.noteLayout(Array.from({{ length: 8 }}, () => long), 200);
// whole notes only: 2 notes of 4 lines fit under the title within MAX_NOTE_LINES, the line after says 6 are left out
check(lay.length <= N.MAX_NOTE_LINES && lay.filter((l) => l.text.startsWith('• ')).length === 2
  && lay[lay.length - 1].text === '(6 more notes in the log)', 'capped lines', lay);
// drawing: one fillText per line, none for no notes
const calls = [];
const ctx = new Proxy({{}}, {{ get: (t, k) => (k in t ? t[k] : (...a) => calls.push([k, ...a])), set: (t, k, v) => ((t[k] = v), true) }});
check(N.drawNotes(ctx, ['a', 'b'], 300, 10) === 3 && calls.filter((c) => c[0] === 'fillText').length === 3, 'drawn', calls);
check(N.drawNotes(ctx, [], 300, 10) === 0, 'nothing drawn');
done();
""", encoding="utf-8")
    r = _run_mjs(node, script)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stdout + r.stderr


def test_web_extension_parses_as_an_es_module(tmp_path):
    node = _node_or_skip()
    src = (WEB / "flowcache.js").read_text(encoding="utf-8")
    # resolve the import against a stub app so the module can be checked (and even evaluated) by node
    stub_dir = tmp_path / "scripts"
    stub_dir.mkdir()
    (stub_dir / "app.js").write_text(
        "export const app = { registered: [], extensions: [], graph: null,\n"
        "  api: { listeners: {}, asked: [], answers: {},\n"
        "    addEventListener(t, f) { (this.listeners[t] = this.listeners[t] || []).push(f); },\n"
        "    async fetchApi(url) { this.asked.push(url); const name = decodeURIComponent(url.split('model_name=')[1]);\n"
        "      const a = this.answers[name] || { known: false, rows: {}, error: 'not found' };\n"
        "      return { ok: true, json: async () => a }; } },\n"
        "  registerExtension(e) { this.registered.push(e); } };\n")
    pack = tmp_path / "extensions" / "pack"  # same depth as /extensions/<pack>/flowcache.js
    pack.mkdir(parents=True)
    (pack / "package.json").write_text('{"type": "module"}')  # node: .js files here are ES modules, as in a browser
    (pack / "flowcache.js").write_text(src, encoding="utf-8")
    for sibling in WEB.glob("*.js"):  # modules flowcache.js imports from its own folder
        if sibling.name != "flowcache.js":
            (pack / sibling.name).write_text(sibling.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "run.mjs").write_text(JS_CHECK + """
globalThis.window = globalThis; globalThis.document = { body: { dataset: {} } };
const { app } = await import('./scripts/app.js');
await import('./extensions/pack/flowcache.js');
if (app.registered.length !== 1) throw new Error('expected one registered extension');
const e = app.registered[0];
for (const k of ['setup', 'beforeRegisterNodeDef', 'nodeCreated', 'loadedGraphNode', 'afterConfigureGraph']) {
  if (typeof e[k] !== 'function') throw new Error('missing hook ' + k); }
// a hook on a node that is not ours, or a broken node, must not throw
e.nodeCreated({ comfyClass: 'FlowCacheCache', widgets: null });
e.nodeCreated({ comfyClass: 'FlowCacheSampler', widgets: null });
e.loadedGraphNode({ type: 'KSampler' });
await e.beforeRegisterNodeDef(function () {}, { name: 'FlowCacheSampler' });
await e.setup();
const settle = () => new Promise((r) => setTimeout(r, 30));
await settle();

// a graph: loader -> sampler.model, cache -> sampler.cache (links as litegraph keeps them)
const ROW = (t, w, kv) => ({ threshold: t, warmup: w, kv_budget: kv, mix_lambda: 0.07 });
app.api.answers['a.safetensors'] = { known: true, key: 'k-a', rows: { flowcache: { slow: ROW(0.1, 5, 0), fast: ROW(0.2, 3, 1) } } };
const links = new Map([[10, { id: 10, origin_id: 1, origin_slot: 0, target_id: 2, target_slot: 0 }],
                       [11, { id: 11, origin_id: 3, origin_slot: 0, target_id: 2, target_slot: 3 }]]);
const nodes = [];
const graph = { links, _nodes: nodes, getNodeById: (id) => nodes.find((n) => n.id == id) || null };
app.graph = graph;
const W = (name, value, precision) => ({ name, value, options: { precision }, callback: null });
function mk(id, cls, widgets, inputs, outputs, proto) {
  const n = Object.assign(Object.create(proto || {}), { id, type: cls, comfyClass: cls, graph, widgets, inputs, outputs,
    size: [300, 100], addCustomWidget(w) { this.widgets.push(w); }, setDirtyCanvas() {},
    computeSize() { return [300, 120]; }, setSize(s) { this.size = s; } });
  nodes.push(n);
  return n;
}
function SamplerType() {}
await e.beforeRegisterNodeDef(SamplerType, { name: 'FlowCacheSampler' });
const loader = mk(1, 'FlowCacheModelLoader', [W('model_name', 'a.safetensors'), W('dtype', 'auto')], [], [{ links: [10] }]);
const sampler = mk(2, 'FlowCacheSampler', [W('steps', 50, 0)],
  [{ name: 'model', link: 10 }, { name: 'positive', link: null }, { name: 'negative', link: null }, { name: 'cache', link: 11 }],
  [{ links: [] }], SamplerType.prototype);
const cache = mk(3, 'FlowCacheCache', [W('method', 'flowcache'), W('preset', 'fast'), W('threshold', 0.5, 3),
  W('warmup_steps', 9, 0), W('kv_budget', 7, 0), W('mix_lambda', 0.3, 3)], [], [{ links: [11] }]);
for (const n of nodes) e.nodeCreated(n);
await settle();
const w = (k) => cache.widgets.find((x) => x.name === k);
const snap = () => ({ t: w('threshold').value, wu: w('warmup_steps').value, kv: w('kv_budget').value,
  locked: !!w('threshold').disabled, shown: w('threshold')._displayValue, wshown: w('warmup_steps')._displayValue,
  source: cache.__fcPreset && cache.__fcPreset.source });
const set = async (node, k, v) => { const x = node.widgets.find((y) => y.name === k); x.value = v; x.callback && x.callback(v); await settle(); };
let s = snap();
check(s.t === 0.2 && s.wu === 3 && s.kv === 1 && s.locked && s.shown === '0.200' && s.wshown === '3' && s.source === 'server', 'fast from the server', s);
check(app.api.asked.some((u) => u.includes('/flowcache/model_presets?model_name=a.safetensors')), 'asked the route', app.api.asked);
check(cache.widgets.some((x) => x.name === 'flowcache_source' && x.serialize === false && x.options.serialize === false), 'source line widget');
await set(cache, 'preset', 'custom');
s = snap();
check(!s.locked && s.t === 0.2 && s.source === 'custom', 'custom unlocks', s);
await set(cache, 'method', 'off');
s = snap();
check(s.locked && s.shown === 'unused' && s.source === 'off', 'off locks', s);
await set(cache, 'method', 'flowcache');
await set(cache, 'preset', 'slow');
s = snap();
check(s.t === 0.1 && s.wu === 5 && s.kv === 0 && s.locked, 'slow', s);
// another model the server does not know: locked, no stale number shown
await set(loader, 'model_name', 'b.safetensors');
s = snap();
check(s.locked && s.shown === 'from model' && s.source === 'model', 'unknown model', s);
// back to a, then unlink the cache node: from the model at run time
await set(loader, 'model_name', 'a.safetensors');
check(snap().source === 'server', 'known again', snap());
cache.outputs[0].links = []; sampler.inputs[3].link = null; links.delete(11);
await e.afterConfigureGraph(); await settle();
s = snap();
check(s.locked && s.shown === 'from model' && cache.__fcPreset.reason === 'unlinked', 'unlinked', [s, cache.__fcPreset]);
// the sampler draws its run's note with the map
sampler.onExecuted({ flowcache_stats: [{ maps: [['CCR', 'CRR']], flops_speedup: 1.5, flops: 2, flops_nocache: 3,
  note: "no cache node connected: FlowCache, the model's slow preset" }] });
const mapW = sampler.widgets.find((x) => x.name === 'flowcache_map');
const ctx = new Proxy({}, { get: (t, k) => (k === 'measureText' ? () => ({ width: 10 }) : k in t ? t[k] : () => {}),
  set: (t, k, v) => ((t[k] = v), true) });
mapW.draw(ctx, sampler, 300, 0);
const drawn = window.__flowcache.drawn['2'];
check(drawn && drawn.windows === 1 && drawn.chunks === 2 && drawn.steps === 3 && /no cache node connected/.test(drawn.note), 'map and note', drawn);
// the server's events reach the sampler they name: progress while the run goes, its stats after, cleared at the end
const fire = (type, detail) => (app.api.listeners[type] || []).forEach((f) => f({ detail }));
fire('flowcache.progress', { node: 2, text: 'window 1/2, step 3/6', value: 3, max: 12 });
check(window.__flowcache.progress['2']?.value === 3 && sampler.__fcInfo.progress?.text === 'window 1/2, step 3/6',
  'progress event on its sampler', sampler.__fcInfo);
fire('flowcache.progress', { node: 99, text: 'elsewhere', value: 1, max: 2 });
check(sampler.__fcInfo.progress?.text === 'window 1/2, step 3/6', "another node's progress leaves it", sampler.__fcInfo);
fire('flowcache.stats', { node: 2, stats: { maps: [['CR', 'CC'], ['', 'RC']], flops_speedup: 1.2, flops: 1, flops_nocache: 1.2 } });
check(!sampler.__fcInfo.progress && window.__flowcache.stats['2']?.maps.length === 2, 'stats event replaces the progress', sampler.__fcInfo);
mapW.draw(ctx, sampler, 300, 0);
check(window.__flowcache.drawn['2'].windows === 2 && window.__flowcache.drawn['2'].steps === 2, 'stats event drawn', window.__flowcache.drawn['2']);
fire('flowcache.progress', { node: 2, text: 'window 1/2, step 1/6', value: 1, max: 12 });
fire('executing', { node: null });
check(!sampler.__fcInfo.progress, 'progress cleared when the prompt is done', sampler.__fcInfo);
// the loader shows what it decided after it ran, until a widget that decides what is loaded changes
function LoaderType() {}
await e.beforeRegisterNodeDef(LoaderType, { name: 'FlowCacheModelLoader' });
const loader2 = mk(4, 'FlowCacheModelLoader', [W('model_name', 'sf.pt'), W('dtype', 'auto'), W('loop', 'causal'),
  W('weights', 'generator_ema'), W('magi_variant', 'auto')], [], [{ links: [] }], LoaderType.prototype);
e.nodeCreated(loader2);
const notesW = () => loader2.widgets.find((x) => x.name === 'flowcache_notes');
loader2.onExecuted({ flowcache_notes: ['causal loop (chosen on the loader)', 'layers: comfy ops'] });
check(notesW() && notesW().serialize === false && notesW().options.serialize === false, 'notes widget, never serialized');
check(notesW().computeSize(300)[1] > 0, 'notes take room', notesW().computeSize(300));
notesW().draw(ctx, loader2, 300, 0);
check(window.__flowcache.notesDrawn['4'].lines === 3, 'title + 2 notes drawn', window.__flowcache.notesDrawn['4']);
loader2.onExecuted({ images: [] });  // an output without notes leaves them
check(notesW().computeSize(300)[1] > 0, 'kept by an output without notes');
await set(loader2, 'dtype', 'fp32');
check(notesW().computeSize(300)[1] > 0, 'dtype does not change what is loaded');
await set(loader2, 'model_name', 'other.safetensors');
check(notesW().computeSize(300)[1] === 0 && loader2.__fcNotes === null, 'cleared by the model widget', loader2.__fcNotes);
notesW().draw(ctx, loader2, 300, 0);
check(window.__flowcache.notesDrawn['4'].lines === 0, 'nothing drawn once cleared');
loader2.onExecuted({ flowcache_notes: ['diffusion forcing loop (x)'] });
await set(loader2, 'loop', 'diffusion_forcing');
check(notesW().computeSize(300)[1] === 0, 'cleared by the loop widget');
loader2.onExecuted({ flowcache_notes: ['diffusion forcing loop (x)'] });
loader2.widgets.find((x) => x.name === 'weights').value = 'generator';  // set without a callback: stale all the same
check(notesW().computeSize(300)[1] === 0, 'hidden when the values no longer match the load');
check(window.__flowcache.errors.length === 0, 'no extension errors', window.__flowcache.errors);
// the map module draws a run's stats on any canvas context
const m = await import('./extensions/pack/flowcache_map.js');
const calls = [];
const ctx2 = new Proxy({}, { get: (t, k) => (k === 'measureText' ? () => ({ width: 10 }) : k in t ? t[k]
  : (...a) => calls.push(k)), set: (t, k, v) => ((t[k] = v), true) });
const info = { stats: { maps: [['CCR', 'CRR'], ['', 'CC']], flops_speedup: 2, flops: 1, flops_nocache: 2 } };
const shown = m.drawMap(ctx2, info, 300, 0);
check(shown && shown.windows === 2 && shown.chunks === 2 && shown.steps === 3 && m.mapHeight(info, 300) > 0
  && calls.includes('fillRect') && shown.note === '' && shown.switches === 0, 'map', shown);
// prompt changes: a marker at the block where each takes effect (causal), at the window that reads it (DF)
const causal = { stats: { maps: [['CCCC', 'CCCC', 'CCCC']], switches: [{ chunk: 1, entry: 2, rule: 'recache' },
  { chunk: 2, entry: 3, rule: 'switch' }, { chunk: 9, entry: 4, rule: 'switch' }] } };
check(m.drawMap(ctx2, causal, 300, 0).switches === 2, 'switch markers (one past the map skipped)');
const df = { stats: { maps: [['CC', 'CC'], ['', 'CC']], switches: [{ chunk: 1, entry: 2, rule: 'window' }] } };
check(m.drawMap(ctx2, df, 300, 0).switches === 1, 'a window switch marker');
console.log('ext ' + e.name);
done();
""", encoding="utf-8")
    r = _run_mjs(node, tmp_path / "run.mjs")
    assert r.returncode == 0 and "ext FlowCache.UI" in r.stdout and "\nok " in r.stdout, r.stdout + r.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
