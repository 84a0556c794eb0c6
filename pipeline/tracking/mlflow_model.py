"""The MLflow pyfunc that serves a diffusers folder (logged as "models from code").

MLflow stores this file with the model, so `mlflow.pyfunc.load_model` and `mlflow models serve`
need diffusers, torch and Pillow but no sdpipe code. Input: a table with a `prompt` column and
optional `negative_prompt`, `seed`, `steps`, `guidance`; output: one base64 PNG per row.
"""

import base64
import io

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

PIPELINE_ARTIFACT = "pipeline"
DEFAULTS = {"negative_prompt": None, "seed": 0, "steps": 25, "guidance": 4.0}


FLUX_TRAINED_GUIDANCE = 1.0


def sampling_arguments(pipeline, prompt: str, negative_prompt: str | None, guidance: float) -> dict:
    """The prompt, guidance and size arguments of a pipeline call as sdpipe's families sample (restated from
    pipeline/diffusion/families, which this file cannot import; tests/test_families.py checks they agree): Flux
    with its guidance embedding at the trained 1.0 and true classifier-free guidance against the empty prompt;
    SD3 and Flux with T5's trained sequence length (their tokenizer's); Z-Image with its guidance as the pipeline
    counts it and Qwen3's trained length; every family at the size its denoiser records."""
    name = type(pipeline).__name__
    if name == "FluxPipeline":
        arguments = {"prompt": prompt, "true_cfg_scale": guidance, "negative_prompt": negative_prompt or "",
                     "guidance_scale": FLUX_TRAINED_GUIDANCE,
                     "max_sequence_length": pipeline.tokenizer_2.model_max_length}
    else:
        arguments = {"prompt": prompt, "guidance_scale": guidance, "negative_prompt": negative_prompt}
    if name == "StableDiffusion3Pipeline":
        arguments["max_sequence_length"] = pipeline.tokenizer_3.model_max_length
    if name == "ChromaPipeline":
        arguments["max_sequence_length"] = pipeline.tokenizer.model_max_length
    if name == "ZImagePipeline":  # its guidance g mixes pos + g·(pos - neg): classifier-free w is g = w - 1
        arguments.update(guidance_scale=guidance - 1, max_sequence_length=pipeline.tokenizer.model_max_length)
    return {**arguments, **trained_size(pipeline)}


def trained_size(pipeline) -> dict:
    denoiser = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer
    side = denoiser.config.get("sample_size")
    if side is None:
        return {}
    height, width = (side, side) if isinstance(side, int) else side
    return {"height": height * pipeline.vae_scale_factor, "width": width * pipeline.vae_scale_factor}


class DiffusersPipelineModel(PythonModel):
    def load_context(self, context):
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
        from diffusers import DiffusionPipeline

        # any family: model_index.json names the pipeline class (StableDiffusionPipeline, ...XLPipeline, ...)
        self.pipeline = DiffusionPipeline.from_pretrained(context.artifacts[PIPELINE_ARTIFACT])
        self.pipeline.set_progress_bar_config(disable=True)
        # sdpipe's device rule (pipeline/runtime/device.py), restated: this file is served without sdpipe's code
        self.pipeline.to(PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device)

    def _image(self, row: dict) -> str:
        settings = {key: row.get(key) if pd.notna(row.get(key)) else value for key, value in DEFAULTS.items()}
        image = self.pipeline(
            **sampling_arguments(self.pipeline, row["prompt"], settings["negative_prompt"],
                                 float(settings["guidance"])),
            num_inference_steps=int(settings["steps"]),
            generator=torch.Generator().manual_seed(int(settings["seed"])),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        return pd.DataFrame({"image": [self._image(row) for row in frame.to_dict(orient="records")]})


mlflow.models.set_model(DiffusersPipelineModel())
