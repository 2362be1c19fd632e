"""ComfyUI side of AnyStory FLUX (phase 1: the MODEL patch; node classes come later)."""
