"""Keeping a registry healthy: ``fsck`` checks that the index and the stores agree and
repairs what a crash or a hand edit left (:mod:`maskhub.maintenance.fsck`)."""
