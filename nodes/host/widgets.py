"""Method settings as node widgets, built from the solver registry.

Settings that several methods share with one default and range (``iterations``, ``tol`` of the
fixed-point family) are one widget; where the registry gives a setting a widget of its own
(``Setting.widget``: renoise's ``iterations`` is ``renoise_iterations``), every method still runs
with its own default. A (lo, hi) pair becomes two integer widgets ``<name>_from`` and
``<name>_to``; a choice whose default differs between methods offers ``auto`` (the selected
method's own default).

Each widget's options carry ``inversion_methods``, the methods that read it: the pack's
frontend extension (``web/js``) shows only the selected method's widgets from that list, so
the registry stays the one owner of which method takes which setting.
"""

from comfy_api.latest import io

from ...solvers import METHODS

AUTO = "auto"
USERS = "inversion_methods"  # widget option read by web/js/inversion_suite.js
# The frontend rounds a FLOAT widget to its step (and shows that many decimals) unless both are
# finer: settings whose range spans decades (tolerances, regularisation) keep this resolution.
FINE = 1e-9


def method_help(names):
    """The method widget's tooltip: a lead line, then one line per method (the frontend keeps line breaks)."""
    return "The inversion method; only its settings are shown below.\n" + "\n".join(
        f"- {name}: {METHODS[name].summary}" for name in names)


def _tag(widget, users):
    # V3 inputs emit ``extra_dict`` into their options; the older host's Combo/Int/Float take no argument for it.
    widget.extra_dict = dict(widget.extra_dict or {}, **{USERS: [n for n, _ in users]})
    return widget


def widget_of(key, s) -> str:
    """The widget that shows setting ``key`` (``s``): its own name unless the registry names another."""
    return s.widget or key


def _users():
    """Widget name -> [(method, Setting)], widgets of earlier releases first (see ``Setting.added``)."""
    found = {}
    for name, m in METHODS.items():
        for key, s in m.settings.items():
            found.setdefault(widget_of(key, s), []).append((name, s))
    return dict(sorted(found.items(), key=lambda kv: kv[1][0][1].added))


def inputs(methods=None):
    """One widget per setting of ``methods`` (default: every method)."""
    out = []
    for key, users in _users().items():
        users = [(n, s) for n, s in users if methods is None or n in methods]
        if not users:
            continue
        s = users[0][1]
        tip = f"{s.tooltip} Used by: {', '.join(n for n, _ in users)}."
        if s.choices:
            options = list(s.choices)
            default = s.default
            if len({u.default for _, u in users}) > 1:
                options, default = [AUTO] + options, AUTO
                tip += " 'auto' takes the selected method's default."
            out.append(_tag(io.Combo.Input(key, options=options, default=default, tooltip=tip, optional=True), users))
        elif isinstance(s.default, tuple):
            for end, v in zip(("from", "to"), s.default):
                out.append(_tag(io.Int.Input(f"{key}_{end}", default=v, min=0, max=100, optional=True,
                                             tooltip=f"{tip} ({end} end)"), users))
        elif isinstance(s.default, int):
            out.append(_tag(io.Int.Input(key, default=s.default, min=int(s.lo), max=int(s.hi), step=int(s.step or 1),
                                         tooltip=tip, optional=True), users))
        else:
            step = FINE if s.hi / s.step > 1e4 else s.step
            out.append(_tag(io.Float.Input(key, default=s.default, min=s.lo, max=s.hi, step=step, round=step,
                                           tooltip=tip, optional=True), users))
    return out


def values(method: str, widgets: dict) -> dict:
    """The selected method's settings from the node's widget values (missing ones: defaults)."""
    out = {}
    for key, s in METHODS[method].settings.items():
        name = widget_of(key, s)
        if isinstance(s.default, tuple):
            v = tuple(widgets.get(f"{name}_{end}", d) for end, d in zip(("from", "to"), s.default))
        else:
            v = widgets.get(name, s.default)
            if v is None or v == AUTO:
                v = s.default
        out[key] = v
    return out
