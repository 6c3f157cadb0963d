"""Single-process reference of a layer-spec model, for exactness checks.

Builds every layer in order exactly as ``PipelineModule(seed_layers=True)`` seeds
them (``base_seed + layer index`` before each build; a tied module built at its
first occurrence, which is the copy DeepSpeed broadcasts to the other owners) and
names parameters as DeepSpeed does (``"3.q.weight"``, ``"tied_modules.embed.weight"``),
so a pipeline rank's parameters can be compared with these by name.
"""

from __future__ import annotations

from functools import partial

from deepspeed.pipe import LayerSpec, TiedLayerSpec
from deepspeed.runtime.utils import set_random_seed
from torch import nn


class SequentialReference(nn.Module):
    def __init__(self, specs: list, loss_fn, base_seed: int = 1234) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.tied_modules = nn.ModuleDict()
        self.layers: list[nn.Module] = []  # the module of each spec, in order (a tied one twice)
        self.funcs = []
        for idx, spec in enumerate(specs):
            set_random_seed(base_seed + idx)
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                module = self.tied_modules[spec.key]
                self.layers.append(module)
                self.funcs.append(
                    module if spec.forward_fn is None else partial(spec.forward_fn, module)
                )
            elif isinstance(spec, LayerSpec):
                module = spec.build()
                self.add_module(str(idx), module)
                self.layers.append(module)
                self.funcs.append(module)
            else:
                raise TypeError(
                    f"layer {idx}: SequentialReference builds LayerSpec/TiedLayerSpec, got {spec!r}"
                )

    def forward(self, x):
        for func in self.funcs:
            x = func(x)
        return x

    def loss(self, inputs, labels):
        return self.loss_fn(self(inputs), labels)
