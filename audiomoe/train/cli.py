"""The ``audiomoe train`` and ``audiomoe eval`` commands (registered into the main parser by ``audiomoe.cli``).

``train TARGET``: TARGET is a built-in recipe (``audiomoe train --list``), a recipe YAML (a mapping
with ``stages:``), or a preset / model-spec YAML (a one-stage recipe). ``--nproc N`` re-runs the
command under torchrun's launcher on this host; under ``torchrun`` itself it trains with DDP.
``eval CHECKPOINT --data ...`` prints a table per task (and per dataset) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, NoReturn, Sequence

from audiomoe.core.argtypes import float_in, int_in, positive_int
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.limits import MAX_BATCH_SIZE
from audiomoe.train.cli_eval import cmd_eval, cmd_predict
from audiomoe.train.cli_flags import _apply_flags, _resumed, _stored_recipe, _train_config

TRAIN_DESCRIPTION = """Train a recipe or a preset. A recipe (built-in: `audiomoe train --list`, or a YAML with
`stages:`) names the model, the data, the optimizer, the schedule and the stages (what trains, on
which data, from which init); a preset or model-spec YAML is a one-stage recipe trained with the
options below. Data (--data): the built-in corpus when every head is one of its tasks (made once
into the cache, AUDIOMOE_CACHE), else synthetic tones (single-label classification heads only).

--set KEY=VALUE: keys starting with a recipe section (optim., schedule., stages., eval., log.,
checkpoint., data, batch_size, precision, compile) change the recipe; other keys override the model
(backbone.moe.router.k=1). Options given on the command line override the recipe's.

seeds: the spec's `seed` fixes the initial parameters; --seed fixes what the run draws (data
order, eval batches, dropout and router noise).

run directory (--out DIR): created and locked before training starts; a DIR that holds another
run is refused unless --resume (continue from its last good checkpoint: model, optimizer, step,
RNG, data position; bit-identical to an unbroken run on CPU) or --overwrite. Logs: DIR/log.jsonl
and DIR/tb (TensorBoard). Ctrl-C stops cleanly and names the last good checkpoint (exit code 130).

processes: `--nproc N` checks the run (recipe, model, layout, batch), then starts N processes on this
host (torchrun's launcher); a rank's failure is printed once, as one line. `torchrun
--nproc-per-node N [--nnodes M ...] -m audiomoe train ...` for more hosts. gloo on CPU, NCCL on
CUDA; --batch-size is the global batch; rank 0 logs and checkpoints. Large models (the recipe's
`distributed:`, or these flags): --expert-parallel N spreads each MoE layer's routed experts over N
ranks (all-to-all), --fsdp shards everything else with FSDP2; checkpoints stay one-process files
(they load with load_checkpoint and resume at any layout), e.g.
  audiomoe train RECIPE --nproc 2 --expert-parallel 2 [--fsdp] --out DIR"""

_PARSER: dict[str, argparse.ArgumentParser] = {}


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line of ``args`` again, without ``--nproc`` (what each torchrun worker runs)."""
    p = _PARSER["train"]
    out = ["train"] + ([args.target] if args.target else [])
    for a in p._actions:
        if not a.option_strings or a.dest in ("help", "nproc", "target"):
            continue
        v, flag = getattr(args, a.dest), a.option_strings[0]
        if v == a.default or v is None:
            continue
        if isinstance(a, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(a, argparse.BooleanOptionalAction):  # --fsdp / --no-fsdp
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            out += [x for item in v for x in (flag, str(item))]
        elif v is True:
            out.append(flag)
        else:
            out += [flag, str(v)]
    return out


def _check_launch(args: argparse.Namespace, out: Any, is_recipe: bool, stored: Any) -> None:
    """What every rank would refuse (options, recipe, model, layout, batch, data), before ``--nproc`` starts one.

    The recipe is composed as the ranks compose it and :func:`audiomoe.train.layout.check_recipe` runs their
    checks on a meta model; the run directory is left to rank 0 (opening it is its first act).
    """
    from audiomoe.train.distributed import pick_device
    from audiomoe.train.layout import check_recipe
    from audiomoe.train.recipe import load_recipe, recipe_for_preset

    pick_device(args.device)
    if is_recipe:
        recipe = _apply_flags(load_recipe(args.target, args.set), args)
    elif stored is not None:
        recipe = _resumed(stored, args)
    elif args.target is not None:
        cfg = _train_config(args, out, False)
        cfg.check()  # what audiomoe.train.train does first
        recipe = recipe_for_preset(args.target, args.set, steps=cfg.steps, **cfg.recipe_fields())
    else:
        return  # a run of an older version records no recipe: its ranks read the spec from the checkpoint
    check_recipe(recipe, args.nproc or 1)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe or a preset (``audiomoe train --help``); a rank of ``--nproc`` hands a failure to its launcher."""
    try:
        return _cmd_train(args)
    except BrokenPipeError:
        raise
    except (Exception, KeyboardInterrupt) as exc:
        from audiomoe.cli import DEBUG_ENV, error_report
        from audiomoe.train.failures import write_failure

        code, line = error_report(getattr(args, "command", None) or "train", exc)
        if (code == 1 and os.environ.get(DEBUG_ENV)) or not write_failure(code, line):
            raise  # not a rank of --nproc (or a bug's traceback asked for): the CLI prints it
        return code


def check_command(argv: Sequence[str]) -> None:
    """Check an ``audiomoe train ...`` command line as the command would before it trains, without training.

    Its options are parsed and the recipe, model (meta device), layout and data are checked exactly as
    ``train --nproc`` checks them before it starts its ranks (what ``audiomoe ablate`` does for each config
    before its first run). Raises :class:`AudioMoEError`; writes nothing.
    """
    from audiomoe.cli import build_parser

    build_parser()  # a parser of our own: its error() is changed below
    parser = _PARSER["train"]

    def refuse(message: str) -> NoReturn:
        raise AudioMoEError(f"audiomoe {' '.join(argv)}: {message}")

    parser.error = refuse  # type: ignore[method-assign]  # argparse's documented way to change how it reports errors
    if not argv or argv[0] != "train":
        raise AudioMoEError(f"not an audiomoe train command line: {list(argv)[:3]}")
    args = parser.parse_args(list(argv[1:]))
    args.command = "train"
    _cmd_train(args, check_only=True)


def _cmd_train(args: argparse.Namespace, check_only: bool = False) -> int:
    from audiomoe.train import train
    from audiomoe.train.distributed import launch
    from audiomoe.train.recipe import find_recipe, list_recipes, load_recipe
    from audiomoe.train.trainer import RunOptions, run_recipe

    if args.list:
        from audiomoe.train.recipe import RECIPE_DIR

        for name in list_recipes():
            rec = load_recipe(str(RECIPE_DIR / f"{name}.yaml"))
            print(f"{name:28s} {rec.summary}")
        return 0
    out = args.out
    from audiomoe.train.rundir import resume_target  # --resume RUN/step-N: that checkpoint of RUN

    if isinstance(args.resume, str):  # --resume DIR
        same = (os.path.abspath(args.resume), os.path.abspath(resume_target(args.resume)[0]))
        if out is not None and os.path.abspath(out) not in same:
            raise AudioMoEError(f"--resume '{args.resume}' and --out '{out}' name different directories; give one")
        out = args.resume
    if args.target is None and not args.resume:
        raise AudioMoEError(
            "give a PRESET (or YAML path) to train, or --resume DIR to continue a run; recipes: audiomoe train --list"
        )
    is_recipe = find_recipe(args.target) is not None if args.target else False
    stored = _stored_recipe(str(resume_target(out)[0])) if args.resume and out and not is_recipe else None
    if check_only:
        _check_launch(args, out, is_recipe, stored)
        return 0
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _check_launch(args, out, is_recipe, stored)  # a configuration error starts no process
        return launch(args.nproc, _argv(args))
    main = int(os.environ.get("RANK", "0")) == 0
    if is_recipe or stored is not None:  # a resumed preset run keeps its recorded options too, not the defaults
        recipe = _apply_flags(load_recipe(args.target, args.set), args) if is_recipe else None
        opts = RunOptions(
            out_dir=out,
            resume=bool(args.resume),
            overwrite=args.overwrite,
            device=args.device,
            progress=not args.quiet and main,
            print_every=args.log_every or 0,
            workers=args.workers,
            adjust=(lambda r: _apply_flags(r, args)) if is_recipe else (lambda r: _resumed(r, args)),
        )
        result = run_recipe(recipe, opts)
    else:
        result = train(args.target, args.set, _train_config(args, out, main))
    if not args.quiet and main:
        from audiomoe.train.heldout import run_summary_text

        print(json.dumps(result, indent=2, default=str) if args.json else run_summary_text(result, out))
    return 0


def register(sub: Any) -> None:
    """Add the ``train``, ``eval`` and ``predict`` commands to the CLI's subparsers."""
    p = sub.add_parser(
        "train",
        help="train a recipe (stages, specialists, freezing) or a preset, with checkpoints and logs",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _PARSER["train"] = p
    p.add_argument(
        "target",
        nargs="?",
        default=None,
        metavar="RECIPE|PRESET",
        help="recipe name, recipe YAML, preset name or spec YAML (optional with --resume)",
    )
    p.add_argument("--list", action="store_true", help="list the built-in recipes and exit")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe or model override, e.g. optim.lr=1e-3, backbone.moe.router.k=1 (repeatable)",
    )
    # The options a recipe also has are range-checked together, all problems at once, by TrainConfig / the recipe.
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="total optimizer steps of a one-stage run (a resumed run continues up to this) [200]",
    )
    p.add_argument("--batch-size", type=int, default=None, help="global items per forward [16]")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate, > 0 [0.003]")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay, >= 0 [0.01]")
    p.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        metavar="NORM",
        help="clip the global gradient norm [1.0]; --set optim.grad_clip=null: no clipping",
    )
    p.add_argument("--accumulation", type=int, default=None, metavar="N", help="micro-batches per optimizer step [1]")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="linear lr warmup steps [5%% of the steps]")
    p.add_argument(
        "--schedule",
        choices=["constant", "linear", "cosine"],
        default=None,
        help="lr decay after warmup, to a tenth of the peak [cosine]",
    )
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="bf16: autocast forward (weights stay fp32) [fp32]"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone and encoder")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="auto: CUDA when available [auto]")
    p.add_argument(
        "--nproc",
        type=int_in(1, 4096),
        default=None,
        metavar="N",
        help="train with N processes on this host (DDP through torchrun's launcher)",
    )
    p.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="N",
        help="spread each MoE layer's routed experts over N ranks (distributed.expert_parallel; needs --nproc)",
    )
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shard the model with FSDP2 over every rank (distributed.fsdp; needs --nproc)",
    )
    p.add_argument(
        "--workers",
        type=int_in(0, 256),
        default=1,
        metavar="N",
        help="data-loader worker processes per rank (0: load in the training process) [1]",
    )
    p.add_argument(
        "--eval-every", type=int, default=None, help="evaluate (and checkpoint, with --out) every N steps, >= 1 [50]"
    )
    p.add_argument("--eval-batches", type=int, default=None, help="held-out batches per evaluation [4]")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fixes the data stream, eval batches and training randomness; the spec's seed fixes the initial weights [0]",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run directory: checkpoints step-N/, latest, log.jsonl, tb/, summary.json",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="N",
        help="also checkpoint every N steps (0: at evaluations and stage ends) [0]",
    )
    p.add_argument(
        "--keep", type=int, default=None, metavar="N", help="checkpoints kept in --out, newest by step (0: all) [2]"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="continue the run in DIR (default: --out) from its last good checkpoint",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds a run (deletes its checkpoints and logs)",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=None,
        metavar="N",
        help="off a terminal, print a progress line every N steps (0: ~10 lines per run) [0]",
    )
    p.add_argument("--no-logs", action="store_true", help="write no log.jsonl / TensorBoard events")
    p.add_argument(
        "--quiet", action="store_true", help="print nothing but errors (the summary is still written to --out)"
    )
    p.add_argument(
        "--json", action="store_true", help="print the whole run summary as JSON instead of the summary table"
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="auto|builtin|tones|MANIFEST",
        help="training data: the built-in corpus, synthetic tones, or a JSONL manifest; auto = the corpus when every head is one of its tasks [auto]",
    )
    p.set_defaults(func=cmd_train)

    q = sub.add_parser(
        "eval", help="evaluate a checkpoint per task and dataset (accuracy, macro-F1, mAP, WER/CER, BLEU, exact match)"
    )
    q.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory or a run directory (its latest)")
    q.add_argument(
        "--data",
        default="auto",
        metavar="auto|builtin|tones|MANIFEST|DATA.yaml",
        help="what to evaluate on [auto: the run's own data when it trained on a manifest or data file, else the corpus or tones]",
    )
    q.add_argument("--split", default="test", help="manifest split [test]")
    q.add_argument("--batch-size", type=int_in(1, MAX_BATCH_SIZE), default=16, help="items per forward [16]")
    q.add_argument("--max-items", type=positive_int, default=None, help="evaluate only the first N items of each task")
    q.add_argument("--device", default="auto", metavar="auto|cpu|cuda")
    q.add_argument(
        "--max-seconds",
        type=float_in(0, lo_open=True),
        default=30.0,
        metavar="S",
        help="longest clip fed to a head: longer ones are cropped for clip-level labels, refused for others [30]",
    )
    q.add_argument(
        "--json", default=None, metavar="FILE", help="where to write the JSON report [RUN_DIR/eval-SPLIT.json]"
    )
    q.add_argument(
        "--asr-run",
        default=None,
        metavar="RUN",
        help="a run with an 'asr' head that transcribes generated speech: codec tasks get asr_wer [the model's own asr head]",
    )
    q.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "predict", help="run a checkpoint on audio files: labels, text, or codec codes written as .npy and .wav"
    )
    r.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory or a run directory (its latest)")
    r.add_argument(
        "audio", nargs="+", metavar="AUDIO", help="audio files (wav, flac, ogg; resampled to the encoder's rate)"
    )
    r.add_argument(
        "--task", action="append", default=[], metavar="TASK", help="only this head (repeatable) [every head]"
    )
    r.add_argument("--prompt", default=None, help="text for prompted heads: the question, the text to speak")
    r.add_argument(
        "--codec",
        default=None,
        metavar="DIR",
        help="fitted codec for codec heads' audio [the corpus's codes codec for the layout]",
    )
    r.add_argument(
        "--out", default=None, metavar="DIR", help="where codec heads write .npy/.wav [CHECKPOINT/../predictions]"
    )
    r.add_argument("--device", default="auto", metavar="auto|cpu|cuda")
    r.add_argument(
        "--max-seconds",
        type=float_in(0, lo_open=True),
        default=30.0,
        metavar="S",
        help="longest audio fed to a head: a longer file is cropped for clip-level labels, refused for others [30]",
    )
    r.add_argument("--json", action="store_true", help="print the rows as JSON")
    r.set_defaults(func=cmd_predict)
