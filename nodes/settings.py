"""Method settings as node widgets, built from the solver registry.

Settings that several methods share (``iterations``, ``tol``) are one widget; a (lo, hi)
pair becomes two integer widgets ``<name>_from`` and ``<name>_to``; a choice whose default
differs between methods offers ``auto`` (the selected method's own default).
"""

from comfy_api.latest import io

from ..solvers import METHODS

AUTO = "auto"


def _users():
    found = {}
    for name, m in METHODS.items():
        for key, s in m.settings.items():
            found.setdefault(key, []).append((name, s))
    return found


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
            out.append(io.Combo.Input(key, options=options, default=default, tooltip=tip, optional=True))
        elif isinstance(s.default, tuple):
            for end, v in zip(("from", "to"), s.default):
                out.append(io.Int.Input(f"{key}_{end}", default=v, min=0, max=100, optional=True,
                                        tooltip=f"{tip} ({end} end)"))
        elif isinstance(s.default, int):
            out.append(io.Int.Input(key, default=s.default, min=int(s.lo), max=int(s.hi), step=int(s.step or 1),
                                    tooltip=tip, optional=True))
        else:
            out.append(io.Float.Input(key, default=s.default, min=s.lo, max=s.hi, step=s.step, round=False,
                                      tooltip=tip, optional=True))
    return out


def values(method: str, widgets: dict) -> dict:
    """The selected method's settings from the node's widget values (missing ones: defaults)."""
    out = {}
    for key, s in METHODS[method].settings.items():
        if isinstance(s.default, tuple):
            v = tuple(widgets.get(f"{key}_{end}", d) for end, d in zip(("from", "to"), s.default))
        else:
            v = widgets.get(key, s.default)
            if v is None or v == AUTO:
                v = s.default
        out[key] = v
    return out
