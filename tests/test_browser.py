"""The pack in the real ComfyUI frontend: headless Chromium driven by Selenium.

The host's ``main.py`` starts on a loopback port with the pack in a ``custom_nodes`` folder
and empty placeholder model files; the frontend the host ships (``comfyui_frontend_package``)
runs in Debian's Chromium through its chromedriver (Selenium never downloads anything here:
``SE_OFFLINE`` and an explicit driver path). Every shipped workflow is loaded as a user opens
it: no missing node type, the widgets keep the file's values (no shift), and the frontend's
own ``app.graphToPrompt()`` passes the server's validation on ``POST /prompt``. The Invert
and InversionSampler nodes show exactly the selected method's settings (the counts come from
the solver registry, not from the extension), ``tol`` and ``lam`` keep 1e-8, Load Inversion
has a working upload button and a value in an empty input folder, titles and text values fit
the nodes' default width, and the template browser shows each workflow's title and thumbnail.

``INVERSION_SUITE_SCREENSHOTS=1`` also writes the README's screenshots
(``docs/screenshots/``) and the template browser's thumbnails (``workflows/<name>.jpg``).
"""

import io
import json
import os
import re
import shutil
import time

import pytest

import comfy_host  # skips this module where no ComfyUI is found

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
from selenium.webdriver.chrome.service import Service  # noqa: E402

from inversion_suite.nodes.host import widgets  # noqa: E402
from inversion_suite.solvers import METHODS  # noqa: E402

ROOT = comfy_host.ROOT
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SHOTS = ROOT / "docs" / "screenshots"
WRITE_SHOTS = os.environ.get("INVERSION_SUITE_SCREENSHOTS") == "1"
NOTES = {"Note", "MarkdownNote"}
BASE_WIDGETS = {"InversionSuite_Invert": ["method", "steps", "scheduler", "cfg", "denoise", "keep_trajectory"],
                "InversionSuite_InversionSampler": ["method"]}
LAST_WIDGETS = {"InversionSuite_Invert": ["measure"], "InversionSuite_InversionSampler": []}  # after the settings
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=2000,1300",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # loopback only


def _which(env, *names):
    found = os.environ.get(env)
    if found:
        return found if os.path.isfile(found) else None
    return next((p for p in map(shutil.which, names) if p), None)


CHROMIUM = _which("CHROME_BIN", "chromium", "chromium-browser", "google-chrome")
DRIVER = _which("CHROMEDRIVER", "chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("no Chromium and chromedriver found (Debian: apt-get install chromium chromium-driver; or set "
                "CHROME_BIN and CHROMEDRIVER)", allow_module_level=True)

def expected_settings(method):
    """The widgets a method's settings become (a (lo, hi) pair is two), from the registry, in the
    node's widget order (a widget added later comes last, whichever setting it shows)."""
    names = []
    for key, s in METHODS[method].settings.items():
        w = widgets.widget_of(key, s)
        names += [f"{w}_from", f"{w}_to"] if isinstance(s.default, tuple) else [w]
    order = [i.id for i in widgets.inputs()]
    return sorted(names, key=order.index)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The host's main.py with only this pack, placeholder models and an input image."""
    tmp = tmp_path_factory.mktemp("browser")
    packs = tmp / "custom_nodes"
    packs.mkdir()
    try:
        (packs / "inversion-suite").symlink_to(ROOT, target_is_directory=True)
    except OSError as e:
        pytest.skip(f"cannot create a symlink to the pack: {e}")
    models = comfy_host.placeholder_models(tmp / "models")
    lines = ["inversion_suite_test:", f"  base_path: {tmp}", f"  custom_nodes: {packs}"]
    lines += [f"  {folder}: models/{folder}" for folder in models]
    config = tmp / "extra_model_paths.yaml"
    config.write_text("\n".join(lines) + "\n")
    dirs = {k: tmp / k for k in ("output", "input", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    comfy_host.workflow_inputs(dirs["input"])
    # A returning user: no first-run template dialog over the canvas.
    (dirs["user"] / "default").mkdir()
    (dirs["user"] / "default" / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True,
        "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasMenu": False,
        "LiteGraph.Canvas.MinFontSizeForLOD": 1}))  # text drawn at the screenshots' zoom
    log_path = tmp / "server.log"
    with comfy_host.serving(config, dirs, log_path) as (base, info):
        yield {"base": base, "info": info, "log": log_path}


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never fetch a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_script_timeout(120)
    try:
        driver.get(server["base"])
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if driver.execute_script("return !!(window.app && window.app.graph && window.app.canvas && "
                                     "window.LiteGraph && LiteGraph.registered_node_types['InversionSuite_Invert'])"):
                break
            time.sleep(1)
        else:
            logs = "\n".join(e["message"] for e in driver.get_log("browser"))[-4000:]
            pytest.fail(f"the frontend did not come up with the pack's nodes within 180 s:\n{logs}")
        driver.execute_script("window.__ext = (app.extensions || []).map(e => e.name)")
        yield driver
    finally:
        driver.quit()


def run(driver, body, *args):
    """An async JS snippet (``args`` in ``A``) whose value (or thrown error) comes back as JSON."""
    script = ("const done = arguments[arguments.length - 1]; const A = arguments[0];"
              "(async () => {" + body + "})().then(v => done({ok: true, v: v}), "
              "e => done({ok: false, v: String(e && e.stack || e)}));")
    out = driver.execute_async_script(script, list(args))
    assert out["ok"], out["v"]
    return out["v"]


def test_the_frontend_is_the_one_asked_for(browser):
    """``COMFYUI_FRONTEND_VERSION`` (with ``COMFYUI_FRONTEND_ROOT``) names the frontend a run must be on;
    frontends from 1.3x on report their version to the page."""
    version = browser.execute_script("return window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    print(f"frontend {version or 'of the host (reports no version)'}")
    wanted = os.environ.get("COMFYUI_FRONTEND_VERSION")
    if wanted:
        assert version == wanted


LOAD = """
const wf = A[0];
await app.loadGraphData(structuredClone(wf), true, true, A[1]);
await new Promise(r => setTimeout(r, 300));
const graph = app.graph.serialize();
const registered = Object.keys(LiteGraph.registered_node_types);
const p = await app.graphToPrompt();
const resp = await api.fetchApi('/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                            body: JSON.stringify({prompt: p.output, client_id: 'browser-test'})});
const answer = await resp.json();
await api.fetchApi('/queue', {method: 'POST', headers: {'Content-Type': 'application/json'},
                              body: JSON.stringify({clear: true})});
const visible = {};
for (const n of app.graph._nodes) visible[n.id] = (n.widgets || []).filter(w => !w.hidden).map(w => w.name);
return {nodes: graph.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? null})),
        registered: registered, status: resp.status, answer: answer, prompt: p.output, visible: visible};
"""


def prep(driver):
    # api and app as module globals of the page (the frontend exposes window.app; the api is app.api or window.comfyAPI)
    driver.execute_script("window.api = window.api || app.api || (window.comfyAPI && comfyAPI.api && comfyAPI.api.api)")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_unchanged_and_its_prompt_validates(path, browser, server):
    prep(browser)
    wf = json.loads(path.read_text(encoding="utf-8"))
    got = run(browser, LOAD, wf, path.stem)
    missing = sorted({n["type"] for n in wf["nodes"]} - set(got["registered"]))
    assert not missing, f"node types missing in the frontend: {missing}"
    after = {n["id"]: n for n in got["nodes"]}
    for node in wf["nodes"]:
        assert node["id"] in after, f"node {node['id']} ({node['type']}) dropped on load"
        assert after[node["id"]]["type"] == node["type"]
        # (the newer frontend writes no widgets_values for a node without widgets)
        assert (after[node["id"]]["widgets_values"] or []) == (node.get("widgets_values") or []), \
            f"node {node['id']} ({node['type']}): widget values changed on load"
    assert got["status"] == 200, got["answer"]
    assert got["answer"].get("node_errors") == {} and not got["answer"].get("error"), got["answer"]
    for nid, node in got["prompt"].items():  # every Invert's visible widgets: its method's settings only
        if node["class_type"] in BASE_WIDGETS:
            method = node["inputs"]["method"]
            kind = node["class_type"]
            assert got["visible"][nid] == BASE_WIDGETS[kind] + expected_settings(method) + LAST_WIDGETS[kind], nid
    if WRITE_SHOTS:
        shoot_graph(browser, path.stem)


COUNT = """
const [type, methods] = A;
app.graph.clear();
const node = LiteGraph.createNode(type);
app.graph.add(node);
const method = node.widgets.find(w => w.name === 'method');
const out = {all: node.widgets.map(w => w.name), options: method.options.values, shown: {}, heights: {}};
for (const m of methods) {
  method.value = m;
  method.callback?.(m);  // as the combo menu does
  out.shown[m] = node.widgets.filter(w => !w.hidden).map(w => w.name);
  out.heights[m] = node.size[1];
}
const p = await app.graphToPrompt();
out.serialized = node.serialize().widgets_values.length;
out.inputs = Object.keys(p.output[String(node.id)].inputs);
return out;
"""


@pytest.mark.parametrize("node_type", ["InversionSuite_Invert", "InversionSuite_InversionSampler"])
def test_each_method_shows_only_its_settings(node_type, browser, server):
    prep(browser)
    info = server["info"][node_type]
    methods = info["input"]["required"]["method"][1]["options"]
    got = run(browser, COUNT, node_type, methods)
    assert got["options"] == methods
    counts = {}
    for m in methods:
        assert got["shown"][m] == BASE_WIDGETS[node_type] + expected_settings(m) + LAST_WIDGETS[node_type], m
        counts[m] = len(got["shown"][m])
    # Hidden widgets still serialize: positional widgets_values and a full prompt whatever the method.
    assert got["serialized"] == len(got["all"])
    assert set(got["inputs"]) == set(got["all"])
    assert len(set(counts.values())) > 1 and max(counts.values()) < len(got["all"])
    # The node's height follows the widgets shown.
    by_count = sorted(methods, key=lambda m: counts[m])
    assert got["heights"][by_count[0]] < got["heights"][by_count[-1]]
    print(f"\n{node_type}: {len(got['all'])} widgets in all; shown per method: "
          + ", ".join(f"{m} {c}" for m, c in counts.items()))
    if WRITE_SHOTS and node_type == "InversionSuite_Invert":
        for m in ("aidi_anderson", "bdia"):
            shoot_node(browser, node_type, m)


SMALL = """
const [name, value] = A;
app.graph.clear();
const node = LiteGraph.createNode('InversionSuite_Invert');
app.graph.add(node);
const method = node.widgets.find(w => w.name === 'method');
method.value = 'aidi_anderson'; method.callback?.('aidi_anderson');
const w = node.widgets.find(w => w.name === name);
// What typing a value into the widget does: setValue runs the widget's rounding callback.
if (w.setValue) w.setValue(value, {e: null, node: node, canvas: app.canvas});
else w.callback.call(w, value);
const p = await app.graphToPrompt();
return {value: w.value, prompt: p.output[String(node.id)].inputs[name], round: w.options.round,
        precision: w.options.precision};
"""


@pytest.mark.parametrize("name", ["tol", "lam"])
def test_small_tolerances_are_settable(name, browser):
    prep(browser)
    got = run(browser, SMALL, name, 1e-8)
    assert got["value"] == pytest.approx(1e-8, rel=1e-9), got
    assert got["prompt"] == pytest.approx(1e-8, rel=1e-9), got
    got = run(browser, SMALL, name, 2.5e-8)
    assert got["value"] == pytest.approx(2.5e-8, rel=1e-9), got


UPLOAD = """
app.graph.clear();
const node = LiteGraph.createNode('InversionSuite_LoadInversion');
app.graph.add(node);
const p = await app.graphToPrompt();
return {widgets: node.widgets.map(w => [w.name, w.type, w.value]), values: node.serialize().widgets_values,
        inputs: p.output[String(node.id)].inputs};
"""


def test_load_inversion_has_an_upload_button_and_a_value_in_an_empty_folder(browser):
    prep(browser)
    got = run(browser, UPLOAD)
    names = [w[0] for w in got["widgets"]]
    assert names == ["inversion", "choose inversion to upload"]
    assert got["widgets"][1][1] == "button"
    assert got["widgets"][0][2] == "none"  # the empty input folder: a value, not "undefined"
    assert got["values"] == ["none"]  # the button is not serialized: widgets_values stay the server's inputs
    assert set(got["inputs"]) == {"inversion"}


def test_the_upload_button_stores_a_file_and_selects_it(browser, tmp_path):
    """The button's file input, given a file as a user picks one: the file lands in the input folder."""
    prep(browser)
    run(browser, UPLOAD)
    picked = tmp_path / "picked.safetensors"
    picked.write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    inputs = browser.find_elements("css selector", 'input[type=file][accept=".safetensors"]')
    assert inputs, "no file input for the upload button"
    inputs[-1].send_keys(str(picked))
    got = run(browser, """
const node = app.graph._nodes.find(n => n.type === 'InversionSuite_LoadInversion');
const w = node.widgets.find(w => w.name === 'inversion');
for (let i = 0; i < 50 && w.value !== 'picked.safetensors'; i++) await new Promise(r => setTimeout(r, 100));
const info = await (await api.fetchApi('/object_info/InversionSuite_LoadInversion')).json();
return {value: w.value, values: w.options.values,
        listed: info.InversionSuite_LoadInversion.input.required.inversion[1].options};
""")
    assert got["value"] == "picked.safetensors" and "none" not in got["values"], got
    assert "picked.safetensors" in got["listed"]


def test_the_upload_route_stores_an_inversion_and_the_node_lists_it(browser, server):
    """The route the button posts to takes a .safetensors file; the refreshed node lists it."""
    prep(browser)
    got = run(browser, """
const body = new FormData();
body.append('image', new File([new Uint8Array([8,0,0,0,0,0,0,0,123,125,32,32,32,32,32,32])], 'uploaded.safetensors'));
body.append('type', 'input');
const resp = await api.fetchApi('/upload/image', {method: 'POST', body});
const saved = await resp.json();
const info = await (await api.fetchApi('/object_info/InversionSuite_LoadInversion')).json();
return {status: resp.status, saved: saved, options: info.InversionSuite_LoadInversion.input.required.inversion[1].options};
""")
    assert got["status"] == 200 and got["saved"]["name"] == "uploaded.safetensors"
    assert "uploaded.safetensors" in got["options"]


TEMPLATES = """
const module = A[0];
const names = (await api.getWorkflowTemplates())[module] ?? [];
const files = {};
for (const n of names) {  // the URL the template browser builds for a custom node's thumbnail
  const r = await fetch(api.apiURL(`/workflow_templates/${module}/${n}.jpg`));
  files[n] = [r.status, r.headers.get('content-type')];
}
const until = async (f, ms) => {
  const t = Date.now();
  while (Date.now() - t < ms) { const v = f(); if (v) return v; await new Promise(r => setTimeout(r, 250)); }
  return null;
};
await app.extensionManager.command.execute('Comfy.BrowseTemplates');
const nav = await until(() => [...document.querySelectorAll('*')].find(
  e => e.children.length === 0 && e.textContent.trim() === module && e.offsetParent !== null), 20000);
if (!nav) throw new Error('the template browser shows no category ' + module);
nav.click();
const dialog = () => [...document.querySelectorAll('[role=dialog]')].pop();
// One loaded picture per card of this pack (the newer frontend shows them through blob: URLs).
// Right after the click the dialog may still show the previous category's cards: a picture
// counts only inside a card titled with one of this pack's templates (its alt text, or an
// ancestor holding that title and no other picture). The browser draws only the cards in view
// (those scrolled away drop their picture), so the pictures are collected while scrolling through.
const nameOf = img => {
  if (names.includes(img.alt)) return img.alt;
  for (let e = img.parentElement; e && e !== dialog(); e = e.parentElement) {
    if (e.querySelectorAll('img').length > 1) return null;
    const n = names.find(n => (e.innerText ?? '').includes(n));
    if (n) return n;
  }
  return null;
};
const seen = {}, titles = new Set();
const thumbs = await until(() => {
  const d = dialog();
  if (!d) return null;
  names.filter(n => (d.innerText ?? '').includes(n)).forEach(n => titles.add(n));
  const imgs = [...d.querySelectorAll('img')];
  for (const i of imgs) {
    const n = nameOf(i);
    if (n && i.complete && i.naturalWidth > 0) seen[n] = [i.naturalWidth, i.naturalHeight];
  }
  if (Object.keys(seen).length >= names.length && titles.size >= names.length) return Object.values(seen);
  for (let e = imgs[0]?.parentElement; e && e !== d.parentElement; e = e.parentElement)
    if (e.scrollHeight > e.clientHeight + 4) {
      e.scrollTop = e.scrollTop + e.clientHeight >= e.scrollHeight - 4 ? 0 : e.scrollTop + e.clientHeight / 2;
      break;
    }
  return null;
}, 30000) ?? [];
for (const e of dialog()?.querySelectorAll('*') ?? []) if (e.scrollTop) e.scrollTop = 0;  // back to the top for the picture
await new Promise(r => setTimeout(r, 500));
const r = dialog()?.getBoundingClientRect();
return {names, files, text: [...titles].join(' | '), thumbs,
        rect: r ? [r.left, r.top, r.width, r.height] : null};
"""


def test_template_browser_shows_titles_and_thumbnails(browser):
    """The frontend titles a custom node's template by its file name and shows <name>.jpg."""
    prep(browser)
    try:
        got = run(browser, TEMPLATES, "inversion-suite")
        assert sorted(got["names"]) == sorted(p.stem for p in WORKFLOWS)
        for name in got["names"]:
            assert got["files"][name] == [200, "image/jpeg"], name
            assert name in got["text"], f"no card titled {name!r}"
        from PIL import Image

        sizes = sorted(list(Image.open(ROOT / "workflows" / f"{n}.jpg").size) for n in got["names"])
        assert sorted(got["thumbs"]) == sizes  # every card shows its thumbnail
        if WRITE_SHOTS and got["rect"]:
            _save_png(_window(browser, got["rect"]), SHOTS / "template_browser.png", 900)
    finally:
        from selenium.webdriver.common.keys import Keys

        browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)
        time.sleep(0.5)


WIDTHS = """
app.graph.clear();
const ctx = document.createElement('canvas').getContext('2d');
const out = {};
for (const type of Object.keys(LiteGraph.registered_node_types).filter(t => t.startsWith('InversionSuite_'))) {
  const node = LiteGraph.createNode(type);
  app.graph.add(node);
  ctx.font = `${LiteGraph.NODE_TEXT_SIZE ?? 14}px sans-serif`;
  const texts = (node.widgets ?? []).filter(w => !w.hidden && typeof w.value === 'string' && w.type !== 'button'
                                            && w.type !== 'customtext')
    .map(w => [w.name, ctx.measureText(`${w.label ?? w.name}${w.value}`).width]);
  ctx.font = `${LiteGraph.NODE_TEXT_SIZE ?? 14}px sans-serif`;
  out[type] = {title: node.title, width: node.size[0], title_width: ctx.measureText(node.title).width, texts};
}
return out;
"""


def test_titles_and_text_values_fit_the_default_width(browser, server):
    """Display names say what a node is and are not cut; text widgets show label and value."""
    prep(browser)
    got = run(browser, WIDTHS)
    assert set(got) == {n for n in server["info"] if n.startswith("InversionSuite_")}
    for node_type, n in got.items():
        assert n["title"] == server["info"][node_type]["display_name"] and " " in n["title"], node_type
        assert n["title_width"] + 40 <= n["width"], (node_type, n)  # the title's dot and padding
        for name, width in n["texts"]:
            assert width + 60 <= n["width"], (node_type, name, n)  # arrows and padding around label and value
    assert not any(n["title"].lower() in ("invert", "invert image", "invertmask") for n in got.values())


# ---------------------------------------------------------------- screenshots (opt-in)

FIT = """
// Fit the nodes (all, or those of type A[0]) into the free part of the window and return that
// part's rectangle in CSS pixels: DOM widgets (prompts, notes) are only in a window screenshot.
const [type, margin] = A;
const nodes = app.graph._nodes.filter(n => !type || n.type === type);
let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
for (const n of nodes) {
  const b = n.getBounding ? n.getBounding() : [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30];
  x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
}
if (!type) {
  for (const g of app.graph._groups ?? app.graph.groups ?? []) {
    const b = g._bounding ?? [g.pos[0], g.pos[1], g.size[0], g.size[1]];
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
}
const pad = 16;
x0 -= pad; y0 -= pad; x1 += pad; y1 += pad;
const r = app.canvas.canvas.getBoundingClientRect();
const [left, top, right, bottom] = margin;
const W = r.width - left - right, H = r.height - top - bottom;
const scale = Math.min(W / (x1 - x0), H / (y1 - y0), 1.4);
app.canvas.show_info = false;
app.canvas.deselectAll?.();
app.canvas.ds.scale = scale;
app.canvas.ds.offset[0] = left / scale - x0;
app.canvas.ds.offset[1] = top / scale - y0;
app.canvas.setDirty(true, true);
app.canvas.draw(true, true);
await new Promise(res => setTimeout(res, 600));
app.canvas.draw(true, true);
return [r.left + left, r.top + top, Math.ceil((x1 - x0) * scale), Math.ceil((y1 - y0) * scale)];
"""
MARGIN = [64, 96, 24, 24]  # left, top, right, bottom: the frontend's side bar and menus


def _window(driver, rect):
    from PIL import Image

    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    x, y, w, h = rect
    return img.crop((int(x), int(y), int(x + w), int(y + h)))


def _save_png(img, path, width):
    img = img.copy()
    img.thumbnail((width, width * 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=128).save(path, optimize=True)


def shoot_graph(driver, name):
    img = _window(driver, run(driver, FIT, None, MARGIN))
    _save_png(img, SHOTS / f"{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.png", 900)
    thumb = img.copy()
    thumb.thumbnail((512, 384))
    thumb.save(ROOT / "workflows" / f"{name}.jpg", quality=82, optimize=True)


def shoot_node(driver, node_type, method):
    run(driver, """
app.graph.clear();
const node = LiteGraph.createNode(A[0]);
node.pos = [40, 60];
app.graph.add(node);
const m = node.widgets.find(w => w.name === 'method');
m.value = A[1]; m.callback?.(A[1]);
""", node_type, method)
    _save_png(_window(driver, run(driver, FIT, node_type, MARGIN)), SHOTS / f"invert_{method}.png", 360)
