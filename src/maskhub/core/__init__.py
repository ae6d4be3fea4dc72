"""The core every feature builds on: what a registered mask is (:mod:`.record`), how a home
is opened and a store becomes a registered mask (:mod:`.home`), safe Ctrl-C
(:mod:`.interrupts`), provenance fields and Ray plumbing. No zarr, torch or numba here."""
