"""AnyStory on FLUX.1-dev (the authors' released ``anystory_flux.bin``), pure torch.

- :mod:`.checkpoint`: read the file (weights-only pickle or its safetensors conversion) → AnyStoryFluxWeights;
- :mod:`.lora`: the ``ref_lora`` / ``router_lora`` as deltas on the extra streams, their enable sites;
- :mod:`.encoder`: the Redux-with-LoRA-and-gate subject encoder (81 tokens) and router embedder (9 tokens);
- :mod:`.routing`: the per-block routing map and the attention bias it implies (the authors' dense form);
- :mod:`.fast`: that bias without a bias tensor (key groups merged by log-sum-exp), hidden reference keys left out;
- :mod:`.blocks`: the AnyStory double/single block forward on ComfyUI's FLUX block modules;
- :mod:`.reference`: the reference pass at t = 0 (per-block reference keys/values);
- :mod:`.adapter`: the file's LoRAs as one module (ComfyUI's model management loads it with the MODEL).

Nothing here imports ComfyUI; ``nodes/flux/`` connects it to a ComfyUI MODEL.
"""
