"""Editing methods: one file each (``blended``, ``direct``, ``stochastic`` on an inversion;
``flowedit``, ``rf_inversion`` on a plain latent) and their shared pieces (``guidance``: the edit
denoiser contract, an edit's calls and blended guidance; ``masks``: the region as a value, its
feather and growth; ``noise``: ancestral steps; ``attention``: the edited words' attention maps).
Pure torch, no host import."""
