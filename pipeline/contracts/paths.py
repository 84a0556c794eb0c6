"""Where every stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.prior_params import CLASS_IMAGES
from pipeline.core.project import project_root


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def resolve(self, path: str | Path) -> Path:
        """A path from params.yaml: relative to the project root unless absolute."""
        return (self.root / Path(path).expanduser()).resolve()

    def input(self, path: str | Path) -> Path:
        """A path from params.yaml naming an input outside the pipeline's files (pipeline/contracts/inputs.py),
        resolved against the project DVC runs for: in an experiment's copy that is the project itself, since
        DVC does not copy such inputs. The class_images stage's output is this copy's own."""
        if Path(path) == Path(CLASS_IMAGES):
            return self.class_images
        return (project_root(self.root) / Path(path).expanduser()).resolve()

    @property
    def inputs(self) -> Path:
        """The fingerprints of the inputs params.yaml names outside the pipeline's files (stage `inputs`)."""
        return self.root / "data" / "inputs"

    @property
    def class_images(self) -> Path:
        """The image prior's class images (stage `class_images`), which ingest reads as the class subset."""
        return self.root / CLASS_IMAGES

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def validated(self) -> Path:
        return self.root / "data" / "validated"

    @property
    def validation_reports(self) -> Path:
        return self.root / "reports" / "validation"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def latents(self) -> Path:
        return self.root / "data" / "latents"

    @property
    def vae_model(self) -> Path:
        return self.root / "models" / "vae"

    @property
    def sd_model(self) -> Path:
        return self.root / "models" / "sd"

    @property
    def batches(self) -> Path:
        """New batches accepted for training by the retraining flow (read by `ingest`)."""
        return self.root / "data" / "batches"

    @property
    def monitoring(self) -> Path:
        """The monitoring history: one record per checked batch and its decision."""
        return self.root / "data" / "monitoring"

    @property
    def checkpoints(self) -> Path:
        """Training state every `train.checkpoint_every` steps; a re-run after a kill resumes from here."""
        return self.root / "models" / "checkpoints"

    @property
    def run_record(self) -> Path:
        """The MLflow run id that `train` opens and `evaluate`/`register` log into."""
        return self.root / "models" / "mlflow_run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def samples_grid(self) -> Path:
        return self.reports / "samples.png"
