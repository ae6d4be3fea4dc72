"""The Hugging Face Hub feature: push, pull and search mask repos (:mod:`.repo`)."""
