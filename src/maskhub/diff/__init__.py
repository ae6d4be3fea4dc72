"""The ``diff`` feature: the streaming pipeline (:mod:`.pipeline`), Ray tasks (:mod:`.ray`),
the ``--rank/--stats`` analyses (:mod:`.analysis`, torch) and the command itself
(:mod:`.run`)."""
