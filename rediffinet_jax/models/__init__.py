"""Flax NNX networks: the optimized U-Net (stage 1) and the Diff-UNet denoiser with its encoder (stage 2)."""
