"""Plain SGD in place of AdamW, for tests that compare runs over different process counts.

With SGD a step moves every weight by ``-lr · gradient``, so two runs' weights differ exactly as much as their
summed gradients do. AdamW divides by ``sqrt(v)``: a weight whose gradient is at rounding level then takes an
lr-sized step whose sign is the rounding's, and the comparison would test float rounding, not the sharding.
"""

import torch

PATCH = """
import torch
torch.optim.AdamW = lambda params, lr, **_: torch.optim.SGD(params, lr=lr, momentum={momentum})
"""
RUN_MODULE = """
import runpy, sys
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def use_sgd(monkeypatch, momentum: float = 0.0) -> None:
    """This process's trainers build SGD where they ask for AdamW (``momentum``: an optimizer with a state that a
    resume must restore, whose update is still linear in the gradients)."""
    sgd = lambda params, lr, **_: torch.optim.SGD(params, lr=lr, momentum=momentum)  # noqa: E731
    monkeypatch.setattr(torch.optim, "AdamW", sgd)


def sgd_script(folder, momentum: float = 0.0, then: str = RUN_MODULE) -> str:
    """A script for a launcher (``torchrun SCRIPT training.sft --config …``) that runs the module with SGD, or runs
    the code ``then`` after the swap."""
    path = folder / "sgd_child.py"
    path.write_text(PATCH.format(momentum=momentum) + then)
    return str(path)


def start_weights(model) -> dict:
    """The transformer's weights before training (fp32), the ``start`` of ``assert_same_updates``."""
    from uniref_core.model import load_components

    return {n: p.detach() for n, p in load_components(model, dtype="fp32").transformer.named_parameters()}


def assert_same_updates(start: dict, one: dict, two: dict) -> None:
    """The weight changes of two runs agree to 1e-4 of the largest change (float32 rounding of gradients summed in
    another order, measured ≤ 4e-5; a wrong shard or scaling changes updates by tens of percent), and some weight
    moved well above rounding, so the comparison means something."""
    deltas = {n: (one[n].float() - start[n].float(), two[n].float() - start[n].float()) for n in one}
    largest = max(float(d1.abs().max()) for d1, _ in deltas.values())
    assert largest > 100 * torch.finfo(torch.float32).eps, f"the largest update is {largest:.2e}: raise the lr"
    for name, (d1, d2) in deltas.items():
        torch.testing.assert_close(d2, d1, rtol=0, atol=1e-4 * largest, msg=lambda m, name=name: f"{name}: {m}")
