"""UniRef engine: SELF multi-reference editing on the Qwen-Image-Edit architecture.

No ComfyUI import here: the nodes, the CLI and the trainers all call into this package.
"""

from .budget import BUDGETS, Plan, allocate_budget, allocate_per_image, plan_references
from .errors import UniRefCancelled, UniRefError
from .images import load_image, pil_to_comfy, split_image_batch
from .pipeline import EditResult, SamplingOptions, SelfConditioning, StepInfo, UniRefPipeline
from .sampling import DenoiseStep, denoise_steps, euler_step, flow_schedule, sde_step, true_cfg

__all__ = [
    "BUDGETS",
    "DenoiseStep",
    "EditResult",
    "Plan",
    "SamplingOptions",
    "SelfConditioning",
    "StepInfo",
    "UniRefCancelled",
    "UniRefError",
    "UniRefPipeline",
    "allocate_budget",
    "allocate_per_image",
    "denoise_steps",
    "euler_step",
    "flow_schedule",
    "load_image",
    "pil_to_comfy",
    "plan_references",
    "sde_step",
    "split_image_batch",
    "true_cfg",
]
