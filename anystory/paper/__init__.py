"""The paper's forms (AnyStory, arXiv 2501.09503), short and plain — the definitions every fast path is
tested against:

- :mod:`.encoder`   — §1.1 subject encoding: QFormer (Resampler) → subject tokens E_i, routing feature R_i;
- :mod:`.router`    — §1.2 routing: coarse map → masked refinement → refined map M_i^l; one-hot/Gumbel
  maps; the routing loss (eq. 4);
- :mod:`.injection` — eq. 5, routed decoupled cross-attention (strength η);
- :mod:`.reference` — eq. 6-8, routed reference attention (strength γ), and G_i^l (ReferenceFeatures);
- :mod:`.attention` — the plain attention they are written in.
"""
