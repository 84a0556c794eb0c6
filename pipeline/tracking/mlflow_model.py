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
            row["prompt"],
            negative_prompt=settings["negative_prompt"],
            num_inference_steps=int(settings["steps"]),
            guidance_scale=float(settings["guidance"]),
            generator=torch.Generator().manual_seed(int(settings["seed"])),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def predict(self, context, model_input, params=None):
        frame = pd.DataFrame(model_input)
        return pd.DataFrame({"image": [self._image(row) for row in frame.to_dict(orient="records")]})


mlflow.models.set_model(DiffusersPipelineModel())
