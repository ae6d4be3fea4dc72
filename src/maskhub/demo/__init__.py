"""The embedded demo: a tiny Llama-shaped model (:mod:`.tinymodel`) trained into a
checkpoint pair (:mod:`.pair`). Needs torch."""
