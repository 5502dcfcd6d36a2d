"""Editing methods: one file each (``blended``, ``direct``, ``stochastic``) and their shared pieces
(``guidance``: the two-branch edit denoiser; ``masks``: the region; ``noise``: ancestral steps;
``attention``: the edited words' attention maps). Pure torch, no host import."""
