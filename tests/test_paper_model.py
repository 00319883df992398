"""The research preset's model, gemma-3-4b-it (Gemma3ForConditionalGeneration: a vision tower beside the text
tower under model.language_model), built from its config.json alone on the meta device: no weights, no download."""

import torch
from transformers import AutoConfig, Gemma3ForConditionalGeneration

from interp_heal.architecture import band_to_layers, decoder_layer_path, decoder_layers, final_norm, text_config
from interp_heal.config import load_config
from interp_heal.heal import add_fresh_adapter

CONFIG_JSON = "tests/fixtures/gemma-3-4b-it/config.json"


def _paper_model() -> Gemma3ForConditionalGeneration:
    with torch.device("meta"):
        return Gemma3ForConditionalGeneration(AutoConfig.from_pretrained(CONFIG_JSON))


def test_layer_path_band_and_lora_targets_resolve_for_gemma_3_4b_it():
    config = load_config("configs/paper.yaml")
    model = _paper_model()
    assert decoder_layer_path(model) == "model.language_model.layers"
    assert len(decoder_layers(model)) == 34 and text_config(model).hidden_size == 2560
    assert final_norm(model) is model.model.language_model.norm
    assert band_to_layers(config.steer.band, 34) == [15, 16, 17, 18]
    student = add_fresh_adapter(model, config.heal, 0)
    adapted = [name for name, module in student.named_modules() if hasattr(module, "lora_A")]
    # only the text tower's blocks of the heal band, each with all seven projections; the vision tower's own
    # q/k/v projections (SigLIP, also under "...layers.N...") stay untouched
    assert adapted and all(".language_model.layers." in name for name in adapted)
    layers = sorted({int(name.split(".language_model.layers.")[1].split(".")[0]) for name in adapted})
    assert layers == band_to_layers(config.heal.band, 34) == list(range(6, 28))
    assert len(adapted) == len(layers) * len(config.heal.target_modules)
