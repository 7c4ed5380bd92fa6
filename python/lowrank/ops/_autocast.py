"""Autocast rules for the training ops: cast floating inputs to the autocast dtype, as ``nn.Linear`` does.

``torch.library.register_autocast`` fixes the target dtype when it is registered; these kernels read it when
they run (``torch.get_autocast_dtype``), so one registration serves bf16 and fp16 regions alike. The casts
happen above autograd (autocast keys come first in the dispatch order), so gradients flow back through them
to the parameters in their own dtype. Like at::autocast's ``cached_cast``, only floating tensors on the
autocast device that are not float64 are cast. The same kernel is installed as a Python-dispatcher kernel
(``py_impl``), which is what ``torch.compile``'s tracing runs.
"""
from __future__ import annotations

import torch

_LIB = torch.library.Library("lowrank", "FRAGMENT")  # noqa: TOR901  (kept alive for the registrations' lifetime)


def _cast(value, device_type: str, dtype: torch.dtype):
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == device_type):
        return value.to(dtype)
    return value


def register_autocast_to_region_dtype(op_name: str, device_types=("cpu", "cuda")) -> None:
    """Give ``lowrank::<op_name>`` an autocast kernel on each device type that casts its floating inputs to
    the enclosing autocast region's dtype and runs the op with autocast off for that device."""
    op = getattr(torch.ops.lowrank, op_name).default
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key, **kwargs):
            dtype = torch.get_autocast_dtype(_device_type)
            args = [_cast(a, _device_type, dtype) for a in args]
            kwargs = {k: _cast(v, _device_type, dtype) for k, v in kwargs.items()}
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args, **kwargs)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(autocast_kernel)
        _LIB.impl(op_name, lambda _keyset, *args, _k=autocast_kernel, **kwargs: _k(*args, **kwargs), key_name,
                  with_keyset=True)
