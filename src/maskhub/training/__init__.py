"""Masked training: mask sources (:mod:`.mask_sources`, torch-free), gradient masking and
the exact freeze (:mod:`.masking`, torch) and checking a run (:mod:`.verify`)."""
