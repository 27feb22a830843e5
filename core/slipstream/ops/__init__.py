"""The ops: each module holds one op's spec (reference, tolerances, inputs) and its public function.

``slipstream.ops.rms_norm(x, w)`` etc. dispatch to the fastest verified implementation.
"""

from slipstream.ops import (
    attention as _attention,
)
from slipstream.ops import (
    cross_entropy as _cross_entropy,
)
from slipstream.ops import (
    geglu as _geglu,
)
from slipstream.ops import (
    linear_cross_entropy as _linear_cross_entropy,
)
from slipstream.ops import (
    lora_linear as _lora_linear,
)
from slipstream.ops import (
    lora_linear_group as _lora_linear_group,
)
from slipstream.ops import (
    rms_norm as _rms_norm,
)
from slipstream.ops import (
    rope as _rope,
)
from slipstream.ops import (
    swiglu as _swiglu,
)
from slipstream.ops._spec import OpSpec, Sample, Tolerance

SPECS: dict[str, OpSpec] = {
    m.SPEC.name: m.SPEC
    for m in (_rms_norm, _rope, _swiglu, _geglu, _cross_entropy, _linear_cross_entropy, _lora_linear,
              _lora_linear_group, _attention)
}

rms_norm = _rms_norm.rms_norm
rope = _rope.rope
swiglu = _swiglu.swiglu
geglu = _geglu.geglu
cross_entropy = _cross_entropy.cross_entropy
linear_cross_entropy = _linear_cross_entropy.linear_cross_entropy
lora_linear = _lora_linear.lora_linear
lora_linear_group = _lora_linear_group.lora_linear_group
attention = _attention.attention


def spec(name: str) -> OpSpec:
    """The :class:`OpSpec` of op ``name``; raises ``KeyError`` listing the known ops."""
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(SPECS)}") from None


__all__ = ["SPECS", "OpSpec", "Sample", "Tolerance", "attention", "cross_entropy", "geglu",
           "linear_cross_entropy", "lora_linear", "lora_linear_group", "rms_norm", "rope", "spec", "swiglu"]
