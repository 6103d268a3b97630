"""Save → load round trips, in-process and through remote code in a fresh process that cannot import microvlm."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

import microvlm
from microvlm import MicroVLMConfig, MicroVLMForCausalLM, MicroVLMModel

from .conftest import make_inputs


pytestmark = pytest.mark.min_version

# Runs in a fresh interpreter, from another working directory, offline, with `microvlm` made unimportable.
LOADER = textwrap.dedent(
    """
    import sys, torch
    sys.modules["microvlm"] = None  # any attempt to import the package now fails
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    folder, inputs_file, result_file = sys.argv[1:4]
    inputs = torch.load(inputs_file)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    result = {"config_class": type(config).__name__}
    body = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()  # the body, as LLaVA maps it
    result["AutoModel"] = (type(body).__name__, body(**inputs).last_hidden_state.detach())
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            result[auto.__name__] = model(**inputs).logits
    result["generated"] = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    result["module"] = type(model).__module__
    torch.save(result, result_file)
    """
)


def run_isolated(script: str, *args: str, cwd) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_save_writes_safetensors_auto_map_and_the_remote_code_modules(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for auto in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
        assert auto in config["auto_map"]
    modules = {
        "configuration_microvlm.py",
        "modeling_microvlm.py",
        "vision_adapter.py",
        "alignment.py",
        "episodic_memory.py",
        "larimar_memory.py",
        "memory_injection.py",
        "memory_cache.py",
    }
    assert modules <= {p.name for p in tmp_path.iterdir()}
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    # The tied LM head is stored once, as the embedding matrix.
    assert "model.language_model.embed_tokens.weight" in names and "lm_head.weight" not in names


@torch.no_grad()
def test_in_process_round_trip_keeps_logits_and_ties(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = MicroVLMForCausalLM.from_pretrained(tmp_path).eval()
    inputs = make_inputs(tiny_config, [5, 2])
    assert torch.equal(loaded(**inputs).logits, tiny_model(**inputs).logits)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


@torch.no_grad()
def test_remote_code_round_trip_in_a_fresh_offline_process(family_model, tmp_path):
    # A RepViT tower (tiny-ember) agrees to float rounding only: see test_remote_code_round_trip_with_a_repvit_tower.
    repvit = family_model.config.vision_config.model_type == "repvit"
    assert_remote_code_round_trip(family_model, tmp_path, atol=1e-5 if repvit else 0.0)


@torch.no_grad()
def test_remote_code_round_trip_with_a_repvit_tower(tmp_path):
    """The saved folder carries repvit.py and registers model_type "repvit" itself: no `microvlm` import needed."""
    vision = {"model_type": "repvit", "image_size": 64, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 2]}
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny", vision_config=vision, vision_num_patches=None))
    # Loaded weights are memory-mapped at offsets that are not 64-byte aligned, and PyTorch's CPU convolutions then
    # take another vectorised path: the loaded tower agrees to float rounding (7e-7 measured), not bit for bit; with
    # its weights cloned into fresh (aligned) memory it agrees exactly.
    assert_remote_code_round_trip(model.eval(), tmp_path, atol=1e-5)
    assert (tmp_path / "saved" / "repvit.py").is_file()


def assert_remote_code_round_trip(tiny_model: MicroVLMForCausalLM, tmp_path: Path, atol: float = 0.0) -> None:
    """Save `tiny_model`, load it in a fresh offline process that cannot import microvlm, compare everything:
    logits and hidden states within `atol` (default: bit for bit), generated tokens exactly."""
    folder, elsewhere = tmp_path / "saved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny_model.save_pretrained(folder)
    inputs = make_inputs(tiny_model.config, [5, 2])
    torch.save(inputs, tmp_path / "inputs.pt")
    run_isolated(LOADER, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "result.pt"), cwd=elsewhere)
    result = torch.load(tmp_path / "result.pt")
    assert result["config_class"] == "MicroVLMConfig" and "transformers_modules" in result["module"]
    expected = tiny_model(**inputs).logits
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        torch.testing.assert_close(result[auto], expected, atol=atol, rtol=0, msg=auto)
    assert result["AutoModel"][0] == "MicroVLMModel"
    body = tiny_model.model(**inputs).last_hidden_state
    torch.testing.assert_close(result["AutoModel"][1], body, atol=atol, rtol=0)
    assert torch.equal(
        result["generated"], tiny_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    )


def flat_imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level packages imported absolutely, sibling modules imported relatively) by one module."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 1 and node.module, f"{path.name}: only `from .module import` travels with a model"
            relative.add(node.module)
    return absolute, relative


def test_the_flat_modules_are_the_remote_code_closure_and_import_only_torch_and_transformers():
    package = Path(microvlm.__file__).parent
    flat = {path.stem for path in package.glob("*.py")} - {"__init__"}
    # What transformers' own dependencies bring (safetensors, PIL, numpy) and the standard library are allowed.
    allowed = {"torch", "transformers", "safetensors", "PIL", "numpy", *sys.stdlib_module_names}
    reached, pending = set(), ["configuration_microvlm", "modeling_microvlm", "processing_microvlm"]
    while pending:
        name = pending.pop()
        reached.add(name)
        absolute, relative = flat_imports(package / f"{name}.py")
        assert absolute <= allowed, f"{name}.py imports {sorted(absolute - allowed)}: move it to a tooling package"
        assert relative <= flat, f"{name}.py imports {sorted(relative - flat)}, not a flat module"
        pending += sorted(relative - reached)
    assert reached == flat, f"flat modules no saved model needs (tooling belongs in a package): {flat - reached}"


def test_auto_model_is_the_body_without_lm_head(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    body = AutoModel.from_pretrained(tmp_path)
    assert type(body) is MicroVLMModel and not hasattr(body, "lm_head")
