"""Autograd functions: the split backward's input gradients now (I), weight gradients
later (W) (:mod:`.split_backward`)."""
