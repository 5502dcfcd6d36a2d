// Inversion Suite's frontend extension (served from the pack's WEB_DIRECTORY).
//
// 1. Method settings: Invert and InversionSampler carry one widget per setting of every
//    method. The server tags each of those widgets with the methods that read it (option
//    "inversion_methods", built from the solver registry), and this extension shows only
//    the selected method's widgets. Hidden widgets stay on the node and keep serializing,
//    so widgets_values stay positional and saved workflows load unchanged.
// 2. Load Inversion: the host has no upload button for non-image files; this adds one that
//    sends a .safetensors file to the input folder through the host's /upload/image route.
// 3. Text widgets of the pack's nodes get the width their label and value need.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const USERS = "inversion_methods";
const LOAD = "InversionSuite_LoadInversion";
const PACK = "InversionSuite_";

function usersOf(nodeData) {
  const found = {};
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData.input?.[section] ?? {})) {
      const methods = spec?.[1]?.[USERS];
      if (Array.isArray(methods)) found[name] = methods;
    }
  }
  return found;
}

function linked(node, name) {
  // A setting fed by a link stays visible: its socket is in use.
  return (node.inputs ?? []).some((s) => (s.widget?.name ?? s.name) === name && s.link != null);
}

function showMethodSettings(node, users, fit = false) {
  const method = node.widgets?.find((w) => w.name === "method")?.value;
  if (method === undefined) return;
  let changed = false;
  for (const w of node.widgets) {
    const methods = users[w.name];
    if (!methods) continue;
    const hide = !methods.includes(method) && !linked(node, w.name);
    if (!!w.hidden !== hide) changed = true;
    w.hidden = hide;
    if (w.options) w.options.hidden = hide;  // read by the newer frontend's node renderers
  }
  if (changed || fit) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

function fitText(node) {
  // Widen the node so its title and text widgets show whole (the default width cut
  // "ReconstructionR…" and Save Inversion's "filename_p…").
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = `${window.LiteGraph?.NODE_TEXT_SIZE ?? 14}px sans-serif`;
  let width = Math.max(node.size[0], ctx.measureText(node.title ?? "").width + 50);  // the title, whole
  for (const w of node.widgets ?? []) {
    if (w.hidden || typeof w.value !== "string" || w.type === "button" || w.type === "customtext") continue;
    width = Math.max(width, ctx.measureText(`${w.label ?? w.name}${w.value}`).width + 80);
  }
  if (width > node.size[0]) node.setSize([Math.ceil(width), node.size[1]]);
}

function addUploadButton(node) {
  const combo = node.widgets?.find((w) => w.name === "inversion");
  if (!combo) return;
  const input = document.createElement("input");
  input.type = "file";
  input.accept = ".safetensors";
  input.style.display = "none";
  input.onchange = async () => {
    const file = input.files?.[0];
    input.value = "";
    if (!file) return;
    const body = new FormData();
    body.append("image", file);  // the route's field name, whatever the file
    body.append("type", "input");
    const resp = await api.fetchApi("/upload/image", { method: "POST", body });
    if (resp.status !== 200) {
      alert(`Load Inversion: uploading ${file.name} failed (${resp.status} ${resp.statusText})`);
      return;
    }
    const saved = await resp.json();
    const name = saved.subfolder ? `${saved.subfolder}/${saved.name}` : saved.name;
    const values = combo.options.values.filter((v) => v !== "none");
    if (!values.includes(name)) values.push(name);
    combo.options.values = values;
    combo.value = name;
    combo.callback?.(name);
    node.setDirtyCanvas?.(true, true);
  };
  document.body.append(input);
  const button = node.addWidget("button", "choose inversion to upload", null, () => input.click());
  button.serialize = false;  // not a value: widgets_values stay as the server's inputs
  button.options = { ...(button.options ?? {}), serialize: false };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    input.remove();
    return onRemoved?.apply(this, arguments);
  };
}

app.registerExtension({
  name: "InversionSuite.Widgets",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const users = usersOf(nodeData);
    const hasSettings = Object.keys(users).length > 0;
    if (!nodeData.name?.startsWith(PACK)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (nodeData.name === LOAD) addUploadButton(this);
      fitText(this);
      if (hasSettings) {
        const method = this.widgets?.find((w) => w.name === "method");
        if (method) {
          const callback = method.callback;
          const node = this;
          method.callback = function () {
            const out = callback?.apply(this, arguments);
            showMethodSettings(node, users);
            return out;
          };
        }
        showMethodSettings(this, users);
      }
      return r;
    };
    if (!hasSettings) return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      // A loaded workflow sets values and size without callbacks: fit the height to the widgets shown.
      showMethodSettings(this, users, true);
      return r;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const r = onConnectionsChange?.apply(this, arguments);
      showMethodSettings(this, users);
      return r;
    };
  },
});
