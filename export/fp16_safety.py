"""fp16 safety in true fp16 arithmetic, along the validation trajectory.

ONNX Runtime's CPU provider runs most fp16 nodes by casting them to fp32 and back (and removes the casts between
such nodes), so an fp16 package that overflows on a phone's GPU / NPU looks fine on a laptop. This check runs
each fp16 component's PyTorch module in `torch.float16` (a copy: the reference stays fp32) on the very inputs
the reference pipeline fed it at every denoising step (`Trajectory.inputs`, runtime/trajectory.py, of the reference
run that export/validate.py records), and reports every non-finite output by component and step. The PyTorch
model keeps in fp32 what the fp16 package keeps in fp32 (EDiT's linear-attention accumulators,
`EDiTConfig.accumulate_fp32`; the normalisation statistics, which torch's and transformers' kernels accumulate in
fp32), so a non-finite value here means an fp16 activation overflowed.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def check_fp16(specs: dict, components: list[str], inputs: dict[str, list[tuple[dict, dict]]]) -> dict:
    """Run each component's module in torch.float16 on its inputs; per component: finite or not, where not.

    `specs`: component name -> export ComponentSpec (module + input specs), as `pipeline_components` builds them;
    `inputs`: component name -> [(label, feed)], as `Trajectory.inputs` gives them.
    """
    report = {}
    for name in components:
        spec = specs[name]
        module = copy.deepcopy(spec.module).half().eval()
        non_finite, largest = [], 0.0
        for label, feed in inputs.get(name, []):
            args = []
            for s in spec.inputs:
                t = torch.from_numpy(np.ascontiguousarray(feed[s.name]))
                args.append(t.half() if t.is_floating_point() else t)
            with torch.inference_mode():
                out = module(*args)
            outs = [out] if torch.is_tensor(out) else list(out)
            bad = {
                o.name: int((~torch.isfinite(t)).sum())
                for o, t in zip(spec.outputs, outs)
                if not torch.isfinite(t).all()
            }
            finite_max = [float(t[torch.isfinite(t)].abs().max()) for t in outs if torch.isfinite(t).any()]
            largest = max([largest, *finite_max])
            if bad:
                non_finite.append({**label, "non_finite_values": bad})
                logger.warning("fp16 safety: %s produced non-finite values at %s: %s", name, label, bad)
        del module
        report[name] = {
            "finite": not non_finite,
            "checks": len(inputs.get(name, [])),
            "non_finite": non_finite,
            "max_abs_output": largest,
            "arithmetic": "torch.float16 (PyTorch CPU)",
        }
    return report
