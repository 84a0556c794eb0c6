"""Prior preservation (train.prior): the settings it needs, the class prompts encode caches, the loss of each kind
against diffusers' DreamBooth formula, the class_images stage's incremental renders, and a `dvc repro` of a subject
run with the image prior. diffusers' prior-preservation bugs (the class half encoded with the instance prompt,
crashes with the option on) reached users because no test turned the option on: these do."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageStat
from safetensors.torch import load_file

from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError, LoraParams, ModelParams, TrainParams
from pipeline.core.params_file import parse_params
from pipeline.core.prior_params import CLASS_IMAGES, PriorParams
from pipeline.diffusion.components import pretrained_scheduler_config
from pipeline.diffusion.families import family_named
from pipeline.stages.class_images import RECORD, class_images
from pipeline.stages.encode import Encoder, encode_captions, shard_captions, split_plan
from pipeline.stages.train import Batch, diffusion_loss
from pipeline.training.modules import Model, lora_config
from pipeline.training.prior import PredictionPrior, dreambooth_loss, per_sample_mse

from .conftest import merge, save_random_base_model, tiny_params_dict, write_pattern

FINETUNE = {"model": {"mode": "finetune", "pretrained": "models/base"}}
CLASS_SUBSET = {"source": "subsets", "trigger": "sks", "subsets": {
    "subject": {"source": "folder", "folder": {"path": "data/bag"},
                "caption": {"instance_prompt": "a photo of {trigger} bag"}},
    "class": {"source": "folder", "folder": {"path": CLASS_IMAGES}}}}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train": {"prior": {"kind": "images"}}, **FINETUNE}, r"train\.prior\.class_prompt: required"),
    ({"train": {"prior": {"kind": "prediction"}}, **FINETUNE}, r"train\.prior\.class_word: required"),
    ({"train": {"prior": {"kind": "prediction", "class_word": "bag"}}}, r"train\.prior\.kind: prediction needs a "
                                                                         r"pretrained model"),
    ({"train": {"prior": {"kind": "prediction", "class_word": "bag"}}, "model": {**FINETUNE["model"], "finetune": "full"}},
     r"set model\.finetune: lora"),
    ({"train": {"prior": {"kind": "prediction", "class_word": "bag"}}, **FINETUNE}, r"ingest\.trigger: required"),
    ({"train": {"prior": {"kind": "images", "class_prompt": "a bag"}}, **FINETUNE},
     r"ingest\.subsets\.class: .*folder: \{path: data/class_images\}"),
    ({"train": {"prior": {"kind": "images", "class_prompt": "a bag", "class_subset": "bags"}}, **FINETUNE,
      "ingest": CLASS_SUBSET}, r"ingest\.subsets\.bags: "),
    ({"train": {"prior": {"prior_loss_weight": -1}}}, r"train\.prior\.prior_loss_weight"),
    ({"train": {"prior": {"kind": "prediction", "class_word": "bag"}}, **FINETUNE, "ingest": CLASS_SUBSET},
     r"ingest\.subsets\.class: reads data/class_images, which only train\.prior\.kind: images renders"),
    ({**FINETUNE, "ingest": CLASS_SUBSET}, r"ingest\.subsets\.class: .*train\.prior\.kind is none"),
])
def test_a_prior_without_what_it_needs_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(overrides)


def test_both_priors_parse_with_what_they_need():
    images = parse_params({"train": {"prior": {"kind": "images", "class_prompt": "a bag"}}, **FINETUNE,
                           "ingest": CLASS_SUBSET})
    assert images.train.prior.class_subset == "class"
    prediction = parse_params({"train": {"prior": {"kind": "prediction", "class_word": ""}}, **FINETUNE,
                               "ingest": {"trigger": "sks"}})
    assert prediction.train.prior.prior_loss_weight == 1.0
    assert parse_params({}).train.prior.kind == "none", "the default run has no prior"


def test_the_class_prompt_replaces_the_trigger_as_a_word():
    prior = PriorParams(kind="prediction", class_word="dog")
    assert prior.class_caption("a photo of sks on a table", "sks") == "a photo of dog on a table"
    assert prior.class_caption("sks, sksx and sks", "sks") == "dog, sksx and dog", "only the whole word"
    assert prior.class_caption("a red circle", "sks") == "a red circle", "no trigger: the caption itself"
    assert PriorParams(kind="prediction", class_word="").class_caption("a photo of sks bag", "sks") == "a photo of bag"


def test_encode_caches_each_samples_class_prompt_in_its_shards_text_file():
    manifest = pd.DataFrame({"id": ["a", "b", "c"], "shard": ["s0", "s0", "s0"], "height": [32] * 3, "width": [32] * 3,
                             "caption": ["a photo of sks bag", "a red bag", ""]})
    vae = Encoder("vae", Paths("."), "vae-key", "float32")
    text = Encoder("base", Paths("."), "text-key", "float32", "sd")
    plain = split_plan(manifest, vae, text, False)
    assert "class_text_row" not in plain, "a run without the prediction prior caches its captions alone"

    def class_caption(caption):
        return PriorParams(kind="prediction", class_word="dog").class_caption(caption, "sks")

    plan = split_plan(manifest, vae, text, False, class_caption)
    rows = shard_captions(manifest["caption"], class_caption)
    assert [rows[row] for row in plan["class_text_row"]] == ["a photo of dog bag", "a red bag", ""]
    assert [rows[row] for row in plan["text_row"]] == ["a photo of sks bag", "a red bag", ""]
    assert plan["text"].iat[0] != plain["text"].iat[0], "the file holding the class prompts has its own name"


def diffusers_dreambooth_loss(model_pred, target, prior_loss_weight):
    """train_dreambooth_lora.py (diffusers examples), with_prior_preservation: instance half, then class half."""
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    return loss + prior_loss_weight * prior_loss


@pytest.mark.parametrize("weight", [1.0, 0.3, 0.0])
def test_the_image_prior_loss_is_diffusers_dreambooth_formula_on_fixed_tensors(weight):
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    is_class = torch.tensor([False, False, False, True, True, True])
    ours = dreambooth_loss(per_sample_mse(prediction, target, None), is_class, weight)
    assert ours == pytest.approx(float(diffusers_dreambooth_loss(prediction, target, weight)), rel=1e-6)
    mixed = torch.tensor([3, 0, 4, 1, 5, 2])  # the sampler deals subsets in any order: the halves are by subset
    assert dreambooth_loss(per_sample_mse(prediction[mixed], target[mixed], None), is_class[mixed], weight) \
        == pytest.approx(float(ours), rel=1e-6)
    if weight == 0:
        assert ours == pytest.approx(float(F.mse_loss(prediction[:3], target[:3])), rel=1e-6), \
            "weight 0: the class images add nothing"


CAPTIONS = ["", "a photo of sks bag", "sks on a table", "a photo of bag bag", "bag on a table"]  # rows 3, 4: classes


@pytest.fixture(scope="module", params=["sd", "flux"])
def lora_model(request, tmp_path_factory):
    """A tiny pretrained denoiser of a DDPM and a flow family with fresh LoRA layers (B zero, as peft initialises
    them), and the text tables of CAPTIONS from the base's own text encoders."""
    root = tmp_path_factory.mktemp(request.param)
    base = str(save_random_base_model(root / "base", request.param))
    family = family_named(request.param)
    denoiser = family.load_denoiser(base, root).requires_grad_(False)
    denoiser.add_adapter(lora_config(family, LoraParams()))
    tables = encode_captions(family.name, family.load_text(base, root), CAPTIONS, 8)
    model = Model(family, None, None, denoiser, family.training_objective(TrainParams(), pretrained_scheduler_config(
        base, root)), trains_text_encoder=False, lora=True)
    return model, tables


def prior_case(lora_model, weight: float):
    """Two samples captioned by rows 1 and 2 of the text tables, whose class prompts are rows 3 and 4."""
    model, tables = lora_model
    channels = model.family.denoiser_latent_channels(model.denoiser)
    latents = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = Batch(latents, {name: table[[1, 2]] for name, table in tables.items()}, torch.zeros(2, 6))
    return PredictionPrior(tables, torch.tensor([3, 4]), weight), batch, torch.tensor([0, 1])


def prediction_loss(model, prior, batch, samples):
    return prior.loss(model, batch, samples, TrainParams(), torch.Generator().manual_seed(7), "cpu")


def test_the_class_half_is_conditioned_on_the_class_prompt(lora_model, monkeypatch):
    prior, batch, samples = prior_case(lora_model, 1.0)
    model, _ = lora_model
    calls = []
    predict = model.family.predict

    def recording(denoiser, noisy, timesteps, conditioning, image_sizes):
        calls.append({name: value.clone() for name, value in conditioning.items()})
        return predict(denoiser, noisy, timesteps, conditioning, image_sizes)

    monkeypatch.setattr(model.family, "predict", recording)
    prediction_loss(model, prior, batch, samples)
    trained, base = calls
    for name, table in prior.tables.items():
        class_states = table[[3, 4]].float()
        assert torch.equal(trained[name][:2], batch.conditioning[name].float()), "first half: the captions"
        assert torch.equal(trained[name][2:], class_states), "class half: the class prompts"
        assert torch.equal(base[name], class_states), "the base's target: the class prompts, not the captions"
        assert not torch.equal(class_states, batch.conditioning[name].float())


def test_the_prediction_prior_is_zero_at_step_zero_and_weight_zero_is_a_plain_run(lora_model):
    weighted, batch, samples = prior_case(lora_model, 1.0)
    model, _ = lora_model
    unweighted = PredictionPrior(weighted.tables, weighted.class_rows, 0.0)
    plain = diffusion_loss(model, batch, TrainParams(), torch.Generator().manual_seed(7), "cpu")
    assert prediction_loss(model, unweighted, batch, samples).item() == pytest.approx(plain.item(), rel=1e-5)
    assert prediction_loss(model, weighted, batch, samples).item() == pytest.approx(plain.item(), rel=1e-5), \
        "LoRA B starts at zero: the LoRA model is the base, and the prior term is 0"

    lora_b = [parameter for name, parameter in model.denoiser.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for parameter in lora_b:
            parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    try:
        for parameter in model.denoiser.parameters():
            parameter.grad = None
        for parameter in lora_b:
            parameter.requires_grad_(True)
        plain = diffusion_loss(model, batch, TrainParams(), torch.Generator().manual_seed(7), "cpu")
        plain.backward()
        plain_grads = [parameter.grad.clone() for parameter in lora_b]
        for parameter in lora_b:
            parameter.grad = None
        zero = prediction_loss(model, unweighted, batch, samples)
        zero.backward()
        assert zero.item() == pytest.approx(plain.item(), rel=1e-5)
        assert all(torch.allclose(a, b.grad, rtol=1e-4, atol=1e-7) for a, b in zip(plain_grads, lora_b, strict=True)), \
            "weight 0: the same gradients as a run without the prior"
        assert prediction_loss(model, weighted, batch, samples).item() > plain.item() + 1e-4, \
            "a trained LoRA drifts from the base on the class prompt: the prior term is positive"
    finally:
        with torch.no_grad():
            for parameter in lora_b:
                parameter.zero_()
                parameter.requires_grad_(False)
                parameter.grad = None


def test_class_images_render_once_and_a_changed_count_renders_only_the_new_ones(tmp_path):
    paths = Paths(tmp_path)
    save_random_base_model(tmp_path / "models" / "base")
    model = ModelParams(mode="finetune", pretrained="models/base")

    def train(num_class_images):
        return TrainParams(prior=PriorParams(kind="images", class_prompt="a photo of a bag", num_inference_steps=2,
                                             num_class_images=num_class_images))

    assert class_images(paths, train=train(num_class_images=2), model=model) == {"rendered": 2, "kept": 0, "removed": 0}
    first = {path.name: path.read_bytes() for path in paths.class_images.glob("*.png")}
    assert len(first) == 2
    assert all((paths.class_images / name).with_suffix(".txt").read_text() == "a photo of a bag\n" for name in first)
    for name in first:
        image = Image.open(paths.class_images / name)
        assert image.size == (32, 32) and max(ImageStat.Stat(image).stddev) > 3, "an image validate accepts"

    assert class_images(paths, train=train(num_class_images=2), model=model) == {"rendered": 0, "kept": 2, "removed": 0}
    assert class_images(paths, train=train(num_class_images=3), model=model) == {"rendered": 1, "kept": 2, "removed": 0}
    after = {path.name: path.read_bytes() for path in paths.class_images.glob("*.png")}
    assert {name: after[name] for name in first} == first, "the first two are kept as they were"
    record = json.loads((paths.class_images / RECORD).read_text())
    assert sorted(record["images"].values()) == [0, 1, 2]

    dog = TrainParams(prior=PriorParams(kind="images", class_prompt="a photo of a dog", num_inference_steps=2,
                                        num_class_images=2))
    assert class_images(paths, train=dog, model=model) == {"rendered": 2, "kept": 0, "removed": 3}, \
        "a new prompt renders every image again"
    assert class_images(paths, train=TrainParams(), model=model) == {"rendered": 0, "kept": 0, "removed": 2}
    assert [path.name for path in paths.class_images.iterdir()] == [RECORD], "no prior: only the record"


@pytest.mark.e2e
def test_dvc_repro_of_a_subject_run_with_each_prior(tmp_path):
    """`dvc repro train` of a LoRA fine-tune on a subject folder with the image prior: class_images renders the
    class subset, ingest reads it beside the subject, train weights it; a second repro runs only `inputs`. Then
    `dvc repro train` with the prediction prior on the subject alone: class_images removes its images, encode caches
    the class prompts (train.prior is one of its params), and train trains with them."""
    from pipeline.contracts.latents import latent_file_keys, load_latents

    from .test_pipeline_e2e import _run, copy_repository, stages_run

    params = merge(tiny_params_dict(), {
        **FINETUNE, "ingest": CLASS_SUBSET,
        "train": {"steps": 4, "batch_size": 4, "sample_every": 0, "validate_every": 4, "checkpoint_every": 4,
                  "prior": {"kind": "images", "class_prompt": "a photo of a bag", "num_class_images": 10,
                            "num_inference_steps": 2, "prior_loss_weight": 0.5}}})
    root = copy_repository(tmp_path / "clone", params)
    for seed in range(10):
        write_pattern(root / "data" / "bag" / f"{seed}.png", seed)
    save_random_base_model(root / "models" / "base")
    out = _run(["dvc", "repro", "train"], root).stdout
    assert {"class_images", "ingest", "encode", "train"} <= stages_run(out), out

    assert len(list((root / CLASS_IMAGES).glob("*.png"))) == 10
    records = pd.read_parquet(root / "data" / "latents" / "train.parquet")
    assert set(records["subset"]) == {"subject", "class"}
    assert set(records.loc[records["subset"] == "class", "caption"]) == {"a photo of a bag"}
    assert (root / "models" / "sd" / "pytorch_lora_weights.safetensors").is_file()
    again = _run(["dvc", "repro", "train"], root).stdout
    assert stages_run(again) == {"inputs"}, again

    # the prediction prior on the subject alone: encode adds the class prompts, train targets the base's
    paths = Paths(root)
    image_prior = json.loads((paths.metrics / "train.json").read_text())
    prediction = merge(params, {"train": {"prior": {"kind": "prediction", "class_word": ""}}})
    prediction["ingest"]["subsets"].pop("class")  # rendered only for the image prior
    (root / "params.yaml").write_text(yaml.safe_dump(prediction, sort_keys=False))
    out = _run(["dvc", "repro", "train"], root).stdout
    assert {"class_images", "ingest", "encode", "train"} <= stages_run(out), out
    cache = load_latents(paths.latents, "train")
    rows = pd.read_parquet(paths.latents / "train.parquet")
    assert set(rows["subset"]) == {"subject"}
    for sample in range(len(rows)):
        file, class_row = paths.latents / rows["text"].iat[sample], int(rows["class_text_row"].iat[sample])
        assert latent_file_keys(file)[class_row] == "a photo of bag", "the caption with the trigger dropped"
        assert torch.equal(cache.text_states["prompt_embeds"][cache.class_text_rows[sample]],
                           load_file(file)["prompt_embeds"][class_row]), "train reads the class prompt's states"
    metrics = json.loads((paths.metrics / "train.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    # two samples forward and backward (caption, class prompt) and the base's forward: more than twice an image's
    assert metrics["flops_per_image"] > 2 * image_prior["flops_per_image"]


def test_in_an_experiments_copy_the_class_images_are_the_copys_own(tmp_path, monkeypatch):
    """An experiment's copy renders its own class images (a stage output), so ingest reads them there, not in the
    project, and the inputs stage leaves them to DVC (fingerprinted, they could be read before they are rendered)."""
    from pipeline.core.project import DVC_ROOT_ENV
    from pipeline.stages.inputs import source_fingerprint

    copy = tmp_path / ".dvc" / "tmp" / "exps" / "run"
    monkeypatch.setenv(DVC_ROOT_ENV, str(tmp_path))
    assert Paths(copy).input(CLASS_IMAGES) == copy / CLASS_IMAGES
    assert Paths(copy).input("data/bag") == tmp_path / "data" / "bag"
    write_pattern(copy / CLASS_IMAGES / "0.png", 0)
    write_pattern(tmp_path / "data" / "bag" / "0.png", 1)
    params = parse_params({"ingest": CLASS_SUBSET, "train": {"prior": {"kind": "images", "class_prompt": "a bag"}},
                           **FINETUNE})
    fingerprint = source_fingerprint(params.ingest, Paths(copy))
    assert fingerprint["subsets"]["class"] == {"input": CLASS_IMAGES, "watched": "as the class_images stage's output"}
