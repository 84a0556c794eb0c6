"""The `sdpipe` command: one sub-command per pipeline stage, plus generation and the registry.

    sdpipe class_images | ingest | validate | preprocess | vae | encode | train | evaluate | register
    sdpipe generate --model models:/sdpipe@champion --prompt "a red circle" -n 4 --out samples/
    sdpipe models | sdpipe promote VERSION [--reason ...] | sdpipe rollback [--reason ...]
    sdpipe services start | stop | status | connect   # the team's servers on this machine (team.env)
    sdpipe --device cpu <command>   # networks on the CPU even where there is a GPU
    sdpipe pending-batches | check-batch FOLDER | decide REPORT... | merge-batches FOLDER...   (--out FILE.json)

Each stage reads params.yaml (or --params) through `pipeline.core.config` and is what dvc.yaml runs.
A problem the user can fix (pipeline.core.errors.UserError, a tracking server's refusal) prints as one
sentence; anything else is a bug and keeps its traceback; `--debug` or SDPIPE_DEBUG=1 shows every traceback.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import read_json, write_json
from pipeline.core.config import Params
from pipeline.core.errors import UserError
from pipeline.core.params_file import PARAMS_FILE, load_params

DEBUG_ENV = "SDPIPE_DEBUG"


def _inputs(params: Params, paths: Paths, _):
    from pipeline.stages.inputs import inputs

    inputs(params, paths)


def _class_images(params: Params, paths: Paths, _):
    from pipeline.stages.class_images import class_images

    class_images(paths, train=params.train, model=params.model)


def _ingest(params: Params, paths: Paths, _):
    from pipeline.stages.ingest import ingest

    ingest(params.ingest, paths, params.ray)


def _validate(params: Params, paths: Paths, _):
    from pipeline.stages.validate import validate

    validate(params.validate_, paths, params.ray)


def _preprocess(params: Params, paths: Paths, _):
    from pipeline.stages.preprocess import preprocess

    preprocess(params.preprocess, paths, params.ray)


def _vae(params: Params, paths: Paths, _):
    from pipeline.stages.vae import vae_stage

    vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)


def _encode(params: Params, paths: Paths, _):
    from pipeline.stages.encode import encode

    encode(paths, encode=params.encode, model=params.model, ray=params.ray, train=params.train,
           ingest=params.ingest)


def _train(params: Params, paths: Paths, _):
    from pipeline.stages.train import train

    train(params, paths)


def _evaluate(params: Params, paths: Paths, _):
    from pipeline.stages.evaluate import evaluate

    evaluate(params, paths)


def _register(params: Params, paths: Paths, _):
    from pipeline.stages.register import register

    result = register(params, paths)
    state = "champion" if result.champion_version == result.version else "challenger"
    print(f"models:/{result.model_name}/{result.version} ({state}; gate {result.gate_metric}: {result.gate_rule})")
    if result.refused:
        print(f"not promoted: {result.refused}")


def _generate(params: Params, paths: Paths, args):
    from pipeline.generate import generate

    written = generate(
        params, paths, model=args.model, prompt=args.prompt, count=args.n, seed=args.seed, out=args.out,
        steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt, scheduler=args.scheduler,
        batch_size=args.batch_size,
    )
    print(f"wrote {len(written)} images and grid.png to {args.out}")


def _models(params: Params, paths: Paths, _):
    from pipeline.contracts.records import CHAMPION, HEADLINE_METRICS, call_in_card
    from pipeline.tracking.champion import list_versions

    versions = list_versions(params, paths)
    if not versions:
        print(f"no versions of {params.register_.model_name} yet: run `dvc repro` or `sdpipe register`")
    for entry in versions:
        headline = ", ".join(f"{k}={v:.4g}" for k, v in sorted(entry["metrics"].items()) if k in HEADLINE_METRICS)
        gate = f"gate {entry['gate']['metric']} ({entry['gate'].get('outcome', '?')})" if entry["gate"] else "gate -"
        print(f"{entry['version']:>4}  {','.join(entry['aliases']) or '-':<22} {headline}  {gate}  "
              f"commit {entry['git_commit'][:10]}")
    champion = next((entry for entry in versions if CHAMPION in entry["aliases"]), None)
    call = champion and call_in_card(champion["description"])
    if call:
        print(f"\nthe champion in plain diffusers (its model card's call; models/sd: the version's model folder):\n\n"
              f"{call}")


def _promote(params: Params, paths: Paths, args):
    from pipeline.tracking.champion import promote

    previous = promote(params, paths, args.version, reason=args.reason, by=getpass.getuser())
    print(f"champion: version {args.version} (was {previous})")


def _rollback(params: Params, paths: Paths, args):
    from pipeline.tracking.champion import rollback

    print(f"champion: version {rollback(params, paths, reason=args.reason, by=getpass.getuser())}")


def _services(params: Params, paths: Paths, args):
    from pipeline import services

    if args.action == "start":
        stack = services.start(paths.root)
        print(f"client settings: {paths.root / 'team.env'}; the DVC remote: .dvc/config.local; data: {stack.state}")
    elif args.action == "stop":
        services.stop(paths.root)
    elif args.action == "connect":
        remote = services.connect(paths.root)
        print(f"DVC remote: {remote}" if remote else "team.env names no DVC remote (or this is no DVC project)")
    if args.action != "connect":
        for name, line in services.status(paths.root).items():
            print(f"{name:<9} {line}")


def _drop_batch(params: Params, paths: Paths, args):
    from pipeline.monitor import drop_demo_batch

    folder = drop_demo_batch(params, paths, shift=args.shift, count=args.n, seed=args.seed)
    print(f"new batch: {folder} ({args.n} images, shift: {args.shift}); run `python -m flows.retrain` to check it")


def _pending_batches(params: Params, paths: Paths, args):
    from pipeline.core.errors import NoChampionError
    from pipeline.monitor import champion_reference, pending_batches

    folders = pending_batches(params.monitor, paths)
    plan: dict = {"incoming": str(paths.resolve(params.monitor.incoming)), "batches": [str(f) for f in folders]}
    if folders:
        try:
            folder, noise_mse, version = champion_reference(params, paths)
            plan["champion"] = {"folder": str(folder), "noise_mse": noise_mse, "version": version}
        except NoChampionError as exc:  # a fresh deployment: the batches wait for a first champion
            plan["no_champion"] = str(exc)
    write_json(args.out, plan)
    print(f"{len(folders)} pending batches in {params.monitor.incoming}"
          + (f"; not checked: {plan['no_champion']}" if "no_champion" in plan else ""))


def _check_batch(params: Params, paths: Paths, args):
    from dataclasses import asdict

    from pipeline.monitor import check_batch

    report = check_batch(args.folder, params, paths, args.champion, args.champion_mse)
    write_json(args.out, asdict(report))
    print(f"{report.batch}: {report.valid}/{report.samples} valid, drifted features: "
          f"{', '.join(report.drifted_features) or 'none'}, MMD p {report.mmd.get('pvalue', float('nan')):.3f}")


def _decide(params: Params, paths: Paths, args):
    from dataclasses import asdict

    from pipeline.monitor import BatchReport, decide, log_monitoring, record

    reports = [BatchReport(**read_json(path)) for path in args.reports]
    decision = decide(reports, params.monitor)
    record(paths, reports, decision)
    log_monitoring(params, paths, reports, decision)
    write_json(args.out, asdict(decision))
    print("\n".join([f"retrain: {decision.retrain}", *decision.reasons]))


def _merge_batches(params: Params, paths: Paths, args):
    from pipeline.monitor import merge_batches

    merged = merge_batches(args.folders, params, paths)
    write_json(args.out, {"merged_samples": merged})
    print(f"merged {merged} samples into {paths.batches}")


STAGES: dict[str, Callable] = {
    "inputs": _inputs,
    "class_images": _class_images,
    "ingest": _ingest,
    "validate": _validate,
    "preprocess": _preprocess,
    "vae": _vae,
    "encode": _encode,
    "train": _train,
    "evaluate": _evaluate,
    "register": _register,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameter file; its folder is the project root")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the accelerator when there is one (default); cpu: force the CPU")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of every error, also of those a user can fix (or {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler in STAGES.items():
        commands.add_parser(name, help=f"run the {name} stage").set_defaults(handler=handler)
    generate = commands.add_parser("generate", help="generate images from a model")
    generate.add_argument("--model", default="models/sd", help="diffusers folder or models:/NAME@ALIAS")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("-n", type=positive_int, default=4, help="number of images")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=positive_int, help="sampling steps (default: evaluate.num_inference_steps)")
    generate.add_argument("--guidance", type=float, help="guidance scale (default: evaluate.guidance_scale)")
    generate.add_argument("--negative-prompt", help="what the image should not show")
    generate.add_argument("--scheduler", help="dpm++, euler, ddim or ddpm (default: dpm++; sd3, flux: their flow "
                          "Euler sampler, the only one they take)")
    generate.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    generate.add_argument("--out", type=Path, default=Path("samples"))
    generate.set_defaults(handler=_generate)
    commands.add_parser("models", help="list registered versions with aliases and metrics").set_defaults(handler=_models)
    promote = commands.add_parser("promote", help="move the champion alias to a version")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", default="promoted by hand")
    promote.set_defaults(handler=_promote)
    rollback = commands.add_parser("rollback", help="give the champion alias back to the previous champion")
    rollback.add_argument("--reason", default="rolled back by hand")
    rollback.set_defaults(handler=_rollback)
    services = commands.add_parser("services", help="the team's servers on this machine (docs/guides/team-setup.md)")
    services.add_argument("action", choices=("start", "stop", "status", "connect"),
                          help="start (what is not running) | stop | status | connect (this clone's DVC remote "
                               "from team.env)")
    services.set_defaults(handler=_services)
    drop = commands.add_parser("drop-batch", help="drop a demo batch of shapes into monitor.incoming")
    drop.add_argument("--shift", default="none", help="none (same distribution), colour (new colours) or "
                      "background (dark backgrounds)")
    drop.add_argument("-n", type=int, default=200, help="number of images")
    drop.add_argument("--seed", type=int, default=1, help="different seeds give different batches")
    drop.set_defaults(handler=_drop_batch)
    _add_monitoring_commands(commands)
    return parser


def positive_int(text: str) -> int:
    """An argument that counts something: 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_monitoring_commands(commands) -> None:
    """The retraining flow's steps, each a command that writes its result as JSON to --out."""
    pending = commands.add_parser("pending-batches", help="list the batches no retraining merged yet, and "
                                  "fetch the champion they are checked against")
    check = commands.add_parser("check-batch", help="validate a batch, measure its drift and the champion on it")
    check.add_argument("folder", type=Path)
    check.add_argument("--champion", type=Path, required=True, help="the champion's diffusers folder")
    check.add_argument("--champion-mse", type=float, required=True, help="the champion's validation noise MSE")
    decide = commands.add_parser("decide", help="decide from batch reports whether to retrain; record why")
    decide.add_argument("reports", type=Path, nargs="+", help="check-batch outputs")
    merge = commands.add_parser("merge-batches", help="copy the batches' valid samples into data/batches")
    merge.add_argument("folders", type=Path, nargs="+")
    for command, handler in ((pending, _pending_batches), (check, _check_batch), (decide, _decide),
                             (merge, _merge_batches)):
        command.add_argument("--out", type=Path, required=True, help="where to write the result (JSON)")
        command.set_defaults(handler=handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.device == "cpu":
        from pipeline.runtime.device import force_cpu

        force_cpu()
    try:
        params = load_params(args.params)
        args.handler(params, Paths(Path(args.params).resolve().parent), args)
    except Exception as exc:
        sentence = user_problem(exc)
        if sentence is None or args.debug or os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise  # a bug (or a CUDA out-of-memory) keeps its traceback
        print(f"sdpipe {args.command}: error: {sentence}", file=sys.stderr)
        return 1
    return 0


def user_problem(exc: BaseException) -> str | None:
    """The sentence for an error the user can fix, else None."""
    if isinstance(exc, UserError):
        return str(exc)
    from pipeline.tracking.server_errors import server_problem

    return server_problem(exc)  # a tracking server that refused or is away: a sentence, not a trace


if __name__ == "__main__":
    sys.exit(main())
