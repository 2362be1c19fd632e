"""The fast inference path: evaluates the paper's forms (anystory.paper) for one-hot maps with fewer,
larger kernels and no per-step host work. It reads the paper forms' contracts; they never import it.

- :mod:`.grouped`   — routing masks carried in extra head dimensions (no bias tensor), staging buffers;
- :mod:`.injection` — eq. 5 as one fused attention, route K/V prepared once per run;
- :mod:`.reference` — eq. 6-8 as one fused attention, reference K/V prepared once per run;
- :mod:`.router`    — the router folded into a few matrices once per run;
- :mod:`.graphs`    — hook bodies and encoder passes replayed from CUDA graphs;
- :mod:`.transfer`  — one device↔host transfer for many tensors, page-locked staging;
- :mod:`.slab`      — one device buffer for the recorded maps of a run.
"""
