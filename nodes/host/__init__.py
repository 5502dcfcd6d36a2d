"""The glue between ComfyUI and the solvers; the node classes in ``nodes/`` build on it.

- ``inputs``: the nodes' input errors and checks of prompts and LATENT extras.
- ``model``: what the pack reads off a host model (its space, its identity, its latents).
- ``run``: running a solver under the host's guider (schedules, progress, scalings).
- ``record``: an inverted LATENT: the solvers' inversion record plus the host facts.
- ``files``: the inversion file format of SaveInversion / LoadInversion.
- ``widgets``: method settings as node widgets, from the solvers' registry.
- ``region``, ``attention``, ``tokens``, ``edit_guider``: the editors' region and two-prompt guider.
"""
