"""Data: BraTS 2023 cases on disk, generated phantoms, the cross-validation split, the grain pipeline."""
