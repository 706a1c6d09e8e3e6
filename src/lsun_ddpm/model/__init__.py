"""The model: ADM's U-Net and its presets, the diffusion math, ADM checkpoint conversion."""
