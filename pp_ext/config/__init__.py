"""The recipe: its keys, types and defaults (:mod:`.schema`), loaded, merged and checked,
and the DeepSpeed config it implies (:mod:`.recipe`)."""
