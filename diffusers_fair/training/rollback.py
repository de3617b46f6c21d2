"""Undo a trainer's set-up when it fails part-way, so that the user's pipeline is left as it was.

Setting up a run changes the pipeline in place: its modules are frozen, put in eval mode, moved to
the device and cast to the mixed-precision dtype; peft wraps layers in LoRA layers; soft tokens are
added to the tokenizer and the embedding table is resized. :class:`SetupSnapshot` records what
these steps change before they run, and :meth:`SetupSnapshot.restore` puts it back.

The snapshot keeps references, not copies, of the modules' tensors (casting and moving replace a
parameter's data, they do not write into it), so it costs no memory on the device; only the
tokenizers are copied, and only when soft tokens are about to be added.
"""

from __future__ import annotations

import copy

import torch


def _attributes(obj) -> dict:
    """``obj.__dict__`` with each dict-valued entry copied: the submodule, parameter, buffer and hook tables,
    peft's configs."""
    return {key: copy.copy(value) if isinstance(value, dict) else value for key, value in vars(obj).items()}


class SetupSnapshot:
    """The state of ``modules`` (and of ``tokenizers``) that a trainer's set-up changes.

    Args:
        modules: the ``torch.nn.Module`` s the set-up may change (other objects are ignored).
        tokenizers: the tokenizers soft tokens will be added to (both of an SDXL pipeline), or none.
    """

    def __init__(self, modules, tokenizers=()):
        submodules = {}
        for module in modules:
            if isinstance(module, torch.nn.Module):
                submodules.update({id(sub): sub for sub in module.modules()})
        self.attributes = [(sub, _attributes(sub)) for sub in submodules.values()]
        parameters = {id(p): p for sub in submodules.values() for p in sub._parameters.values() if p is not None}
        self.parameters = [(p, p.data, p.requires_grad) for p in parameters.values()]
        configs = {id(sub.config): sub.config for sub in submodules.values()
                   if hasattr(getattr(sub, "config", None), "__dict__")}
        self.configs = [(config, _attributes(config)) for config in configs.values()]
        self.tokenizers = [(tokenizer, copy.deepcopy(tokenizer).__dict__) for tokenizer in tokenizers]

    def restore(self) -> None:
        """Put everything recorded back: submodules, hooks, modes, flags, parameter data, dtypes, devices,
        ``requires_grad``, configs and the tokenizers."""
        for obj, attributes in [*self.attributes, *self.configs]:
            vars(obj).clear()
            vars(obj).update(attributes)
        for parameter, data, requires_grad in self.parameters:
            parameter.data = data
            parameter.requires_grad_(requires_grad)
        for tokenizer, attributes in self.tokenizers:
            vars(tokenizer).clear()
            vars(tokenizer).update(attributes)
