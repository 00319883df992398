"""interp_heal: steer, heal, repeat.

The few objects a researcher composes; everything else lives in the module named after its concept.

    import interp_heal as ih

    config = ih.load_config("configs/demo.yaml")
    model, tokenizer, info = ih.load_model(config.model.spec)
    pair, readout = ih.persona_pair(config.persona), ih.readout_items(config.persona)
    vector = ih.extract_steering_vector(model, tokenizer, pair, ih.context_prompts(64), config.steer.band)

README.md walks through a whole round; `run_loop(config)` runs the loop with resumable stages.
"""

from interp_heal.axis_check import AxisCheck, check_axis
from interp_heal.bake import bake
from interp_heal.collect import Collection, collect_kept_completions
from interp_heal.config import (
    Config,
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    HealConfig,
    LoopConfig,
    ModelConfig,
    PersonaConfig,
    SteerConfig,
    load_config,
)
from interp_heal.evaluate import evaluate
from interp_heal.generate import Completion, generate_completions
from interp_heal.heal import HealResult, heal
from interp_heal.loop import run_loop
from interp_heal.models import load_model
from interp_heal.paired_items import ReadoutItems, readout_items
from interp_heal.personas import PersonaPair, context_prompts, persona_pair, task_prompts
from interp_heal.steer import Steering, SteeringVector, extract_steering_vector, steered_generate, steered_logits

__all__ = [
    "AxisCheck",
    "Collection",
    "Completion",
    "Config",
    "EvalConfig",
    "FilterConfig",
    "GenerateConfig",
    "HealConfig",
    "HealResult",
    "LoopConfig",
    "ModelConfig",
    "PersonaConfig",
    "PersonaPair",
    "ReadoutItems",
    "SteerConfig",
    "Steering",
    "SteeringVector",
    "bake",
    "check_axis",
    "collect_kept_completions",
    "context_prompts",
    "evaluate",
    "extract_steering_vector",
    "generate_completions",
    "heal",
    "load_config",
    "load_model",
    "persona_pair",
    "readout_items",
    "run_loop",
    "steered_generate",
    "steered_logits",
    "task_prompts",
]
