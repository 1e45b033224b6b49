"""The shipped ``subquad-nano`` checkpoint: small enough to ship, bf16, loadable with transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import subquad  # noqa: F401  (registers the Subquad model type)
from subquad.demo import default_model_path

PATH = default_model_path()
pytestmark = pytest.mark.skipif(not (PATH / "config.json").is_file(), reason="subquad-nano is not shipped")


def test_checkpoint_is_small_bf16_safetensors():
    weights = sorted(PATH.glob("*.safetensors"))
    assert weights, "no safetensors in the shipped model"
    assert sum(f.stat().st_size for f in weights) <= 25 * 10**6
    assert json.loads((PATH / "config.json").read_text())["dtype"] == "bfloat16"


def test_loads_with_auto_classes_and_writes_code():
    tokenizer = AutoTokenizer.from_pretrained(PATH)
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32)
    assert model.config.attention == "ssa" and model.config.position_scheme == "local_rope"
    ids = tokenizer("import numpy as np\n\n\ndef ", return_tensors="pt").input_ids
    loss = model(input_ids=ids, labels=ids).loss
    # An untrained model scores ln(8192) = 9.0 per token; the trained one far less on plain code.
    assert loss.item() < 5.0
