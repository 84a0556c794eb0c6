"""The model card's plain-diffusers call (issue 34): its python block, run as written in a fresh Python process
that imports no sdpipe code, draws what `sdpipe generate` draws for the same prompt and seed. The other families'
scratch and LoRA cards are run the same way in tests/test_family_training.py, on the models it trains."""

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.contracts.paths import Paths
from pipeline.contracts.records import CALL_HEADING, MODEL_CARD, call_in_card
from pipeline.core.config import EvaluateParams, Params
from pipeline.generate import generate
from pipeline.stages.train import train

from .conftest import save_random_base_model
from .test_finetune import finetune_params, project

# Fused LoRA weights (W + BA, what models/sd holds) and separate ones (Wx + B(Ax), what load_lora_weights runs)
# round differently in float32; over a few sampling steps that moves a pixel by a level or two of 255.
LORA_PIXEL_TOLERANCE = 3


def card_blocks(model: Path) -> tuple[list[str], dict]:
    """The python blocks of the card's plain-diffusers section (the model's call, then for LoRA the base's),
    and the options of the `sdpipe generate` command the card says they draw as."""
    section = (model / MODEL_CARD).read_text(encoding="utf-8").partition(CALL_HEADING)[2]
    words = shlex.split(re.search(r"`sdpipe generate (.*?)`", section).group(1))
    options = dict(zip(words[::2], words[1::2], strict=True))
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL), options


def drawn(code: str) -> dict:
    """The pipe(...) call's keywords (the prompt among them) and generator seed."""
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
    call = next(call for call in calls if getattr(call.func, "id", None) == "pipe")
    seed = next(call.args[0].value for call in calls if getattr(call.func, "attr", None) == "manual_seed")
    keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords if keyword.arg != "generator"}
    return {"seed": seed, **keywords}


def run_without_sdpipe(code: str, root: Path, folder: Path) -> np.ndarray:
    """The card's code run in a fresh process from a folder that sees the project's models/ (as the card's
    relative paths expect), with no sdpipe on the path and the hub offline; the image it saved."""
    folder.mkdir(parents=True)
    (folder / "models").symlink_to(root / "models")
    script = folder / "card.py"
    script.write_text(code + "\nimport sys\nassert 'pipeline' not in sys.modules, 'the card imported sdpipe'\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = ast.literal_eval(re.findall(r"image\.save\((.*)\)", code)[-1])
    return np.asarray(Image.open(folder / saved))


def assert_card_draws_as_sdpipe(params: Params, paths: Paths, folder: Path, *, block: int = 0,
                                tolerance: int = 0) -> str:
    """Block `block` of models/sd's card draws the image of the `sdpipe generate` command the card names (its
    prompt, seed, steps and guidance): identical pixels, or within `tolerance` levels. Returns the code."""
    blocks, options = card_blocks(paths.sd_model)
    code, command = blocks[block], dict(prompt=options["--prompt"], seed=int(options["--seed"]),
                                        steps=int(options["--steps"]), guidance=float(options["--guidance"]))
    call = drawn(code)
    assert (call["prompt"], call["seed"], call["num_inference_steps"]) == (
        command["prompt"], command["seed"], command["steps"])
    plain = run_without_sdpipe(code, paths.root, folder / "plain")
    generated = generate(params, paths, model=str(paths.sd_model), count=1, out=folder / "sdpipe", **command)
    ours = np.asarray(Image.open(generated[0]))
    assert plain.shape == ours.shape, (plain.shape, ours.shape)
    difference = np.abs(plain.astype(int) - ours.astype(int)).max()
    print(f"{paths.sd_model}: the card's block {block} against sdpipe generate: max pixel difference {difference}")
    assert difference <= tolerance, f"the card's call draws other pixels than sdpipe generate (max {difference})"
    return code


def test_the_default_runs_card_draws_what_sdpipe_generate_draws(trained_project, tmp_path):
    params, paths = trained_project
    code = assert_card_draws_as_sdpipe(params, paths, tmp_path)
    assert "StableDiffusionPipeline.from_pretrained('models/sd')" in code
    defaults = EvaluateParams()  # what `sdpipe generate` samples with unless told
    assert f"num_inference_steps={defaults.num_inference_steps}," in code
    assert f"guidance_scale={defaults.guidance_scale}," in code
    assert "height" not in code, "the pipeline reads the trained size from the UNet's config: no need to pass it"
    assert call_in_card((paths.sd_model / MODEL_CARD).read_text()) == code


def test_a_lora_cards_call_on_the_base_draws_what_the_fused_model_draws(trained_project, tmp_path):
    base = str(save_random_base_model(tmp_path / "tiny-sd"))
    params = finetune_params(base, finetune="lora", lora={"rank": 4, "alpha": 4})
    paths, _ = project(trained_project, tmp_path / "project", params)
    train(params, paths, tracked=False)
    code = assert_card_draws_as_sdpipe(params, paths, tmp_path / "lora", block=1, tolerance=LORA_PIXEL_TOLERANCE)
    assert f"from_pretrained({base!r})" in code and "pipe.load_lora_weights('models/sd')" in code
