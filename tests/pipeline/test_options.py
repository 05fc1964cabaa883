import argparse
from dataclasses import dataclass

import pytest

from saap.pipeline.config import EvalConfig, PruneConfig
from saap.pipeline.evaluate import EvalSettings
from saap.pipeline.options import add_options, from_args, option, section_model
from saap.pipeline.prune import PruneSettings


@dataclass
class Toy:
    count: int = option(3, "how many")
    names: list[str] = option(help="names", factory=lambda: ["a"], choices=("a", "b", "c"))
    scale: float | None = option(None, "optional scale")
    fast: bool = option(False, "go fast")
    safe: bool = option(True, "stay safe")
    hidden: int = option(7, "set by code only", cli=False, yaml=False)
    sizes: list[int] = option(help="sizes", factory=list)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def parse(cls, argv, **kw):
    parser = _Parser()
    add_options(parser, cls, **kw)
    return from_args(cls, parser.parse_args(argv))


def test_flags_follow_the_fields():
    assert parse(Toy, []) == Toy()
    toy = parse(Toy, ["--count", "5", "--names", "b,c", "a", "--scale", "0.5", "--fast", "--no-safe"])
    assert toy == Toy(count=5, names=["b", "c", "a"], scale=0.5, fast=True, safe=False)
    with pytest.raises(ValueError, match="--sizes takes int values"):
        parse(Toy, ["--sizes", "1,x"])
    assert parse(Toy, ["--sizes", "1,2", "3"]).sizes == [1, 2, 3]
    with pytest.raises(ValueError, match="--hidden"):
        parse(Toy, ["--hidden", "1"])
    with pytest.raises(ValueError, match="invalid int"):
        parse(Toy, ["--count", "many"])


def test_a_section_has_the_fields_types_and_defaults():
    Section = section_model(
        Toy, "ToySection", defaults={"count": 4}, extra={"enabled": (bool, False)}, not_flags=("enabled",)
    )
    section = Section(names=["c"], safe=False, enabled=True)
    assert section.count == 4 and "hidden" not in Section.model_fields
    # enabled is the run's own key; a verb default is not repeated; a True default turned off is --no-X
    assert section.flags() == ["--count", "4", "--names", "c", "--no-safe"]
    with pytest.raises(ValueError, match="names"):
        Section(names=["z"])


@pytest.mark.parametrize(
    "config, settings_cls",
    [
        (PruneConfig(method="flap", ratio=0.3, compensation="none", num_samples=8), PruneSettings),
        (EvalConfig(tasks=["piqa", "arc_easy"], limit=10, ppl_windows=4), EvalSettings),
    ],
)
def test_the_run_config_and_the_verb_mean_the_same_settings(config, settings_cls):
    """What a stage passes to its verb parses back into exactly the settings the YAML section holds."""
    fields = settings_cls.__dataclass_fields__
    assert parse(settings_cls, config.flags()) == settings_cls(**{k: v for k, v in config if k in fields})
