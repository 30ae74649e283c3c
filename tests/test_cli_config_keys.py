"""``maspo-megatron config --recipe R``: every key of a recipe with its type, value, default and doc."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field

import pytest

from maspo_megatron.cli import list_recipes, load_recipe, main
from maspo_megatron.config import apply_overrides, describe, field_docs, format_value, to_dict


@dataclass(frozen=True)
class _Base:
    #: An inherited comment-above doc.
    clamp: float = 20.0


@dataclass(frozen=True)
class _Styles(_Base):
    """A section.

    listed: a class-docstring entry, continued
      on a more indented line.
    """

    attr: int = 1
    """An attribute docstring,
    on two lines."""
    trailing: str = "x"  # a trailing comment
    # a comment above,
    # on two lines
    above: bool = False
    listed: list[int] = field(default_factory=list)
    bare: float | None = None


def test_field_docs_reads_every_doc_style_of_the_source():
    assert field_docs(_Styles) == {
        "clamp": "An inherited comment-above doc.",
        "attr": "An attribute docstring, on two lines.",
        "trailing": "a trailing comment",
        "above": "a comment above, on two lines",
        "listed": "a class-docstring entry, continued on a more indented line.",
    }


def _leaf_paths(cfg, prefix=""):
    """The settable keys of a config tree, walked independently of ``describe``."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_paths(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def config_json(capsys, *argv) -> dict[str, dict]:
    assert main(["config", *argv, "--json"]) == 0
    return {k["key"]: k for k in json.loads(capsys.readouterr().out)}


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_key_is_listed_and_its_shown_value_reads_back(recipe, capsys):
    try:
        cfg = load_recipe(recipe)
    except NotImplementedError as e:  # the MoE recipe, until its conversion exists
        pytest.skip(str(e))
    shown = config_json(capsys, "--recipe", recipe)
    assert list(shown) == list(_leaf_paths(cfg))
    for key in shown.values():
        assert key["type"] and set(key) == {"key", "type", "value", "default", "required", "doc"}
    # The text form lists the same keys, each written so that `key=value` sets exactly that value.
    assert main(["config", "--recipe", recipe]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = [re.match(r"(\S+) = (.*)  \[(.+); default (.*)\]$", ln) for ln in lines if not ln.startswith((" ", "#"))]
    assert all(entries) and [m.group(1) for m in entries] == list(shown)
    # Pasted into a shell (strings with a newline are shown JSON-escaped, which a shell keeps).
    pasted = [shlex.split(f"{m.group(1)}={m.group(2)}")[0] for m in entries if "\\n" not in m.group(2)]
    assert len(pasted) >= len(entries) - 1
    assert to_dict(apply_overrides(load_recipe(recipe), pasted)) == to_dict(cfg)


def test_types_values_defaults_and_docs_of_known_keys(capsys):
    keys = config_json(capsys, "--recipe", "tiny_cpu")
    lr = keys["actor.optimizer.lr"]
    assert (lr["type"], lr["value"], lr["default"]) == ("float", 1e-3, 1e-6)
    assert lr["doc"].startswith("Peak learning rate")
    assert keys["data.max_prompt_len"]["type"] == "int" and keys["data.max_prompt_len"]["value"] == 16
    assert keys["data.max_prompt_len"]["default"] == 1024
    assert "dropped at load time" in keys["data.max_prompt_len"]["doc"]  # class-docstring entry
    assert (keys["model.fp8"]["type"], keys["model.fp8"]["value"]) == ("str | None", None)
    assert keys["model.path"]["doc"].startswith("Hugging Face model directory")
    assert keys["parallel.tp"]["value"] == 2 and keys["parallel.tp"]["default"] == 1
    assert keys["steps"]["doc"] and keys["output_dir"]["doc"]
    assert "m = sigma_base / p_old**alpha" in keys["actor.losses.maspo.alpha"]["doc"]  # trailing comment
    assert "clamped" in keys["actor.losses.maspo.log_ratio_clamp"]["doc"]  # inherited `#:` comment
    # The text form: `key = value  [type; default D]`, then the doc indented.
    assert main(["config", "--recipe", "tiny_cpu"]) == 0
    out = capsys.readouterr().out
    assert "\nactor.optimizer.lr = 0.001  [float; default 1e-06]\n    Peak learning rate" in out
    assert "\nmodel.fp8 = none  [str | None; default none]\n" in out


def test_overrides_are_applied_to_the_shown_values(capsys):
    keys = config_json(capsys, "--recipe", "tiny_cpu", "actor.optimizer.lr=3e-4", "data.max_prompt_len=64",
                       "model.fp8=hybrid", "wandb_project=proj")
    assert keys["actor.optimizer.lr"]["value"] == 3e-4 and keys["actor.optimizer.lr"]["default"] == 1e-6
    assert keys["data.max_prompt_len"]["value"] == 64
    assert keys["model.fp8"]["value"] == "hybrid" and keys["wandb_project"]["value"] == "proj"
    assert main(["config", "--recipe", "tiny_cpu", "actor.optimizer.lr=3e-4"]) == 0
    assert "\nactor.optimizer.lr = 0.0003  [float; default 1e-06]\n" in capsys.readouterr().out


def test_bad_overrides_and_recipes_are_config_errors(capsys):
    assert main(["config", "--recipe", "tiny_cpu", "actor.optimizer.lr=fast"]) == 2
    assert "actor.optimizer.lr: expected float, got 'fast'" in capsys.readouterr().err
    assert main(["config", "--recipe", "no_such_recipe"]) == 2
    assert "unknown recipe 'no_such_recipe'" in capsys.readouterr().err


def test_train_help_points_at_the_config_command(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "maspo-megatron config --recipe R" in " ".join(capsys.readouterr().out.split())


def test_values_are_written_as_on_a_command_line():
    assert [format_value(v) for v in (None, True, 0.5, "fp32", "", "a b", [1, 2], {"x": 1})] == [
        "none", "true", "0.5", "fp32", '""', '"a b"', "[1,2]", '{"x":1}']
    assert format_value(dataclasses.MISSING) == "(required)"
    assert [k.key for k in describe(_Styles())] == ["clamp", "attr", "trailing", "above", "listed", "bare"]
