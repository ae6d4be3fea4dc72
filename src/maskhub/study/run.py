"""``maskhub study``: train the paper's runs in miniature and measure them with maskhub.

Offline and on the CPU: a small Qwen2 is pretrained on a synthetic addition task (θ_pre),
SFT'd on its answer format (θ_sft), then trained with TRL's DPO (two seeds, and once from
θ_pre) and GRPO, and again with DPO restricted to the first DPO run's mask (Conjecture 1).
Every checkpoint is bf16 under ``OUT/checkpoints`` (each RL run's start and end: the
trajectories are recorded live, with no intermediate checkpoint); every measurement is
registered; the report is ``OUT/report.md`` (+ ``report.json``, ``figures/``).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from maskhub.errors import NameTakenError, StudyInterruptedError, UsageError
from maskhub.kernels.threads import torch_threads
from maskhub.registry.api import Mask, Registry
from maskhub.schemas.names import invalid_mask_name_message
from maskhub.study.findings import findings
from maskhub.study.measure import Measurer, StudyNames
from maskhub.study.model import study_device
from maskhub.study.report import StudyReport, query_tables, write_report
from maskhub.study.requirements import check_requirements
from maskhub.study.runs import TrainedStudy, check_seeds, train_all
from maskhub.study.sizes import DEFAULT, QUICK, StudySize, resolve_size
from maskhub.study.tables import table_specs
from maskhub.study.verdicts import verdicts

if TYPE_CHECKING:
    from maskhub.study.hub import HubStudy

#: Torch threads of every training step and evaluation, whatever the machine's core count:
#: float reductions split across threads round differently, so the study's numbers would
#: otherwise depend on the machine (1 vs 2 threads diverged at pretraining step 7).
STUDY_THREADS = 1


def prepare_output(output: Path) -> None:
    """Create ``output``; it must be new or an empty directory (one-line errors)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output} already exists and is not an empty directory; choose "
                         "another --out (the study never overwrites checkpoints or a report)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {output}: {exc.strerror or exc}") from None


def choose_names(registry: Registry, name: str | None, seeds: int = 1) -> StudyNames:
    """The study's names: ``name`` if every mask name it makes is valid and free (else a
    one-line error), or the first free ``study``, ``study-2``, ``study-3``... (``seeds``:
    the study's seeds, which decide its runs)."""
    if name is not None:
        names = StudyNames(name, seeds)
        for mask in names.every_mask():
            try:
                registry.check_new_name(mask)
            except NameTakenError:
                raise UsageError(f"the registry already has a mask named {mask!r} from a "
                                 f"study named {name!r}; choose another --name or remove its "
                                 "masks") from None
            except UsageError:
                raise UsageError(f"--name {name!r} cannot prefix the study's masks: "
                                 f"{invalid_mask_name_message(mask)}") from None
        return names
    for k in range(1, 1000):
        names = StudyNames("study" if k == 1 else f"study-{k}", seeds)
        if not _registered(registry, names):
            return names
    raise UsageError("no free study name from study to study-999; pass --name")


def _registered(registry: Registry, names: StudyNames) -> list[str]:
    """The masks of study ``names`` that are registered (the live trajectories' points
    ``NAME-step-N`` included)."""
    existing = [r["name"] for r in registry.ls(None)]
    points = sorted((n for n in existing if names.is_point(n)),
                    key=lambda n: (n.rsplit("-step-", 1)[0], int(n.rsplit("-step-", 1)[1])))
    return [n for n in names.every_mask() if n in existing] + points


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the trainers' progress bars, info logs and deprecation warnings (they would
    bury the study's own lines) for the duration, and restore them afterwards."""
    import datasets
    import transformers

    bars = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore",
                                    module=r"(trl|transformers|torch|datasets|accelerate)")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def study(output: str | os.PathLike[str], *, quick: bool = False, size: str | None = None,
          lr: float | None = None, steps: int | None = None, seeds: int | None = None,
          name: str | None = None, from_hub: str | None = None,
          home: str | os.PathLike[str] | None = None, seed: int = 0,
          say: Callable[[str], None] = print) -> StudyReport | HubStudy:
    """Run the whole study into directory ``output`` (new or empty) and register its masks
    in ``home``'s registry. ``size``: ``default`` or ``quick`` (``quick=True``: the small
    size CI runs); ``lr`` / ``steps``: the RL learning rate and steps (DPO, GRPO and the
    equal-budget SFT controls), overriding the size's; ``seeds``: train DPO, GRPO and the
    equal-budget SFT control from θ_sft with this many seeds (intervals across them in the
    seeds table and the verdicts; default: the size's, 2 for ``default``, 1 for ``quick``).
    ``from_hub``: no training; the checkpoint-only tables
    of the pairs it names (:func:`maskhub.study.hub.parse_pairs`; returns a
    :class:`~maskhub.study.hub.HubStudy`). ``say``: progress lines. Returns the
    report (also written to ``output/report.md`` and ``report.json``). Bad values are
    one-line :class:`~maskhub.errors.UsageError` errors, raised before anything is written."""
    started = time.perf_counter()
    check_requirements()
    if from_hub is not None:
        given = [flag for flag, value in (("--quick", quick), ("--size", size), ("--lr", lr),
                                          ("--steps", steps), ("--seeds", seeds)) if value]
        if given:
            raise UsageError(f"--from-hub trains nothing; it cannot go with {given[0]}")
        return _from_hub(Path(output).resolve(), from_hub, name, home, say)
    chosen = _choose_size(quick, size, lr, steps)
    if seeds is not None:
        chosen = dataclasses.replace(chosen, seeds=check_seeds(seeds))
    output = Path(output).resolve()
    registry = Registry(home)
    registry.check_writable()
    names = choose_names(registry, name, chosen.seeds)
    prepare_output(output)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with quiet_libraries(), torch_threads(STUDY_THREADS):
            flags = _flags(quick, size, lr, steps, seeds)
            report = _run(output, chosen, names, registry, seed, flags, say, started)
    except KeyboardInterrupt:
        done = _registered(registry, names)
        raise StudyInterruptedError(
            f"interrupted: the study registered {len(done)} complete mask(s) before it "
            f"stopped ({', '.join(done) or 'none'}); checkpoints so far are in {output}. "
            f"Rerun with another --out and --name, or 'maskhub rm' them") from None
    say(f"wrote {report.paths['markdown']}")
    return report


def _from_hub(output: Path, text: str, name: str | None,
              home: str | os.PathLike[str] | None, say: Callable[[str], None]) -> HubStudy:
    """``--from-hub``: check the pairs and the names, prepare ``output``, measure."""
    from maskhub.study.hub import choose_prefix, parse_pairs, study_from_hub

    pairs = parse_pairs(text)
    registry = Registry(home)
    registry.check_writable()
    prefix = choose_prefix(registry, name, pairs)
    prepare_output(output)
    return study_from_hub(output, pairs, registry=registry, prefix=prefix, say=say)


def _choose_size(quick: bool, size: str | None, lr: float | None, steps: int | None
                 ) -> StudySize:
    """The size ``--quick`` / ``--size`` name, with ``--lr`` / ``--steps`` applied."""
    if quick and size not in (None, QUICK.name):
        raise UsageError(f"--quick is --size quick; it cannot go with --size {size}")
    return resolve_size(QUICK.name if quick else size or DEFAULT.name, lr=lr, steps=steps)


def _flags(quick: bool, size: str | None, lr: float | None, steps: int | None,
           seeds: int | None = None) -> list[str]:
    """The size flags as the command line gave them (for the report's command)."""
    out = ["--quick"] if quick else ["--size", size] if size else []
    out += ["--lr", f"{lr:g}"] if lr is not None else []
    out += ["--steps", str(steps)] if steps is not None else []
    out += ["--seeds", str(seeds)] if seeds is not None else []
    return out


def _run(output: Path, size: StudySize, names: StudyNames, registry: Registry, seed: int,
         flags: list[str], say: Callable[[str], None], started: float) -> StudyReport:
    """Train, measure, write the report (the body of :func:`study`)."""
    from maskhub.study.task import make_tokenizer, split_problems

    tokenizer = make_tokenizer()
    split = split_problems(size.max_operand, size.n_heldout, seed)
    dataset = f"addition-0-{size.max_operand - 1}"
    measurer = Measurer(registry, names, size, dataset, say)
    maskhub_seconds = 0.0

    def timed_register(trained: TrainedStudy, run: str) -> Mask:
        nonlocal maskhub_seconds
        t = time.perf_counter()
        mask = measurer.mask_for(trained, run)
        maskhub_seconds += time.perf_counter() - t
        return mask

    say(f"study {names.prefix!r} ({size.name} size) into {output}")
    t_train = time.perf_counter()
    trained = train_all(output / "checkpoints", size, split, tokenizer, seed, timed_register,
                        say, record_for=measurer.record_for, runs=names.runs)
    maskhub_seconds += trained.record_seconds  # the live trajectories, inside the loops
    training_seconds = time.perf_counter() - t_train - maskhub_seconds

    t = time.perf_counter()
    measured = measurer.measure_all(trained, output / "figures")
    tables = query_tables(registry, table_specs(names))
    maskhub_seconds += time.perf_counter() - t

    n_params = measured.masks["sft"].n_params
    total = time.perf_counter() - started
    report = StudyReport(
        prefix=names.prefix,
        header={"command": shlex.join(["maskhub", "--home", str(registry.home), "study",
                                       *flags, "--name",
                                       names.prefix, "--out", str(output)]),
                "size": size.to_dict(), "flags": flags, "device": study_device(),
                "n_params": n_params,
                "n_train": len(split.train),
                "n_heldout": len(split.heldout), "seed": seed, "tag": names.tag,
                "dataset": dataset, "n_pairs": trained.pairs,
                "commands": _commands(registry, names, trained, output)},
        tables=tables, figures=measured.figures,
        timing={"total_seconds": round(total, 1), "training_seconds": round(training_seconds, 1),
                "maskhub_seconds": round(maskhub_seconds, 1),
                "record_seconds": round(trained.record_seconds, 1),
                "curve_seconds": round(trained.curve_seconds, 1),
                "fp32_seconds": round(measurer.fp32_seconds, 1),
                "other_seconds": round(total - training_seconds - maskhub_seconds, 1),
                **{f"train_{run}_seconds": round(f.train_seconds, 1)
                   for run, f in trained.facts.items()}},
        masks=[m.name for m in measured.masks.values()])
    report.verdicts = verdicts(report, names)
    report.findings = findings(report, names)
    write_report(report, output, str(registry.home))
    return report


def _commands(registry: Registry, names: StudyNames, trained: TrainedStudy, output: Path
              ) -> list[str]:
    """The maskhub commands that recompute the report's measurements from the registry."""
    def rel(run: str, final: bool = True) -> str:
        path = trained.final_of(run) if final else trained.start_of(run)
        return str(path.relative_to(output))

    mh = f"maskhub --home {shlex.quote(str(registry.home))}"
    full, grpo = names.mask("dpo-s0"), names.mask("grpo-s0")
    return [
        f"{mh} ls --where \"list_contains(tags, '{names.tag}')\"",
        f"{mh} show {full}",
        f"{mh} show {full} --control {names.fp32('dpo-s0')}",
        f"{mh} diff {rel('dpo-s0', False)} {rel('dpo-s0')} --sweep 0,1e-8,1e-7,1e-6,1e-5,1e-4"
        f",1e-3 --rank --stats --name {names.prefix}-again-dpo-s0",
        f"{mh} overlap {full} {names.mask('dpo-s1')}",
        f"{mh} overlap {full} {grpo} --per module",
        f"{mh} plot {full} --kind sparsity -o figures/figure3-dpo-s0.png",
        f"{mh} sql \"SELECT p.step, p.n_updated_vs_first, p.n_updated_vs_prev, "
        "p.n_not_in_final FROM trajectory_points p JOIN trajectories t ON t.id = "
        f"p.trajectory_id WHERE t.name = '{names.trajectory('dpo-s0')}' ORDER BY p.idx\"",
        f"{mh} verify {full} {rel('dpo-sub-s0', False)} {rel('dpo-sub-s0')}",
        f"{mh} compare {rel('dpo-sub-s0')} {rel('dpo-s0')} --mask {full} --tol 0 --tol 1e-5",
    ]
