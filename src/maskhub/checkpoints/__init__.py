"""Reading checkpoints: the one safetensors header reader (:mod:`.header`), local and Hub
sources (:mod:`.sources`, :mod:`.hubio`), zero-copy mmap access (:mod:`.mapped`) and
tensor pairing (:mod:`.pairing`). No tensor library is imported here."""
