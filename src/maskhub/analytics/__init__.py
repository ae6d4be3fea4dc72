"""Analytics over registered masks: overlap and its baselines (:mod:`.overlap` and the
``overlap_*`` modules), mask algebra (:mod:`.combine`), trajectories, summaries and plots."""
