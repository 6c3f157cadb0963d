"""Checkpoints: tags and completeness (:mod:`.tags`), resuming under another layout
(:mod:`.reshape`, :mod:`.optimizer_state`), and the export to a ``from_pretrained`` folder (:mod:`.export`)."""
