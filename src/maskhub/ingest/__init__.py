"""Masks made elsewhere (a hand-written Zarr store, a safetensors file of masks, arrays from
Python), read (:mod:`.sources`) and registered like any other (:mod:`.add`)."""
