"""The bottom layer, pure Python: writing files whole (:mod:`.files`) and one logger for what
pp-ext says while it works (:mod:`.logging`)."""
