"""The Hugging Face Hub feature: :mod:`.push`, :mod:`.pull` and :mod:`.search` of mask repos
(their layout and manifest: :mod:`.layout`; card and Parquet: :mod:`.card`).

A mask's Hub repo holds (the contract of DESIGN.md, documented in ``docs/hub.md``):

* ``mask.zarr/``: the Zarr v3 store as in the registry, its ``hub_repo`` attribute naming
  the repo;
* ``maskhub.json``: the schema version, the mask metadata (the store's group attributes)
  and the sha256 and size of every other file maskhub wrote;
* ``tensors.parquet``: per-tensor stats (and tolerance-sweep counts), for the Hub's viewer
  and for readers without Zarr;
* ``README.md``: a model card with YAML front matter (``library_name: maskhub``, tags,
  ``base_model``...) so that the Hub's search finds the mask.

Every generated file is a pure function of the mask and the target repo (no timestamps), so
pushing an unchanged mask again uploads nothing and makes no commit. A pull trusts nothing it
downloads: paths, versions, checksums and the arrays' counts are all checked before anything
is registered. huggingface_hub reads ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` itself; maskhub never reads, prints or logs the token.
"""
