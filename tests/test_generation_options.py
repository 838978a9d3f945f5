"""`GenerationOptions`: fields grouped by what reads them, each group validated in one place, bare names
routed to their group, old names refused with the new one named (Python, YAML and CLI)."""

from __future__ import annotations

import dataclasses

import pytest

from lrkit.inference.options import (GROUPS, DualReferenceOptions, GenerationOptions, InferenceError, LayoutOptions,
                                     RetouchOptions, field_group, field_path, moved_keys)
from test_cli_errors import run_cli


def test_field_names_are_unique_across_groups():
    names = [f.name for f in dataclasses.fields(GenerationOptions) if f.name not in GROUPS]
    for cls in GROUPS.values():
        names += [f.name for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


def test_bare_names_go_to_their_group():
    options = GenerationOptions.of(mode="layout", lam=0.5, swap=False, sam_weight=1.0, num_inference_steps=7)
    assert options.layout == LayoutOptions(lam=0.5)
    assert options.retouch == RetouchOptions(swap=False, sam_weight=1.0)
    assert options.dual_reference == DualReferenceOptions()
    assert (options.mode, options.num_inference_steps) == ("layout", 7)
    again = options.replace(lam=0.2, mask_threshold=0.3)
    assert again.layout.lam == 0.2 and again.retouch.mask_threshold == 0.3 and again.retouch.sam_weight == 1.0
    assert options.layout.lam == 0.5  # replace copies
    assert [field_group(n) for n in ("mode", "lam", "swap_levels", "style_shift")] == [None, "layout", "retouch",
                                                                                        "dual_reference"]
    assert field_path("style_reference") == "options.dual_reference.style_reference"


@pytest.mark.parametrize("fields, words", [
    (dict(lam=1.5), "lam must be in [0, 1]"),
    (dict(sam_weight=2.0), "sam_weight and mask_threshold"),
    (dict(swap_start=-0.1), "swap_start must be in [0, 1]"),
    (dict(foreground="swap"), "foreground 'swap' is not one of ['concatenate', 'replace']"),
    (dict(reference_weight=0.0), "reference_weight must be a finite number > 0"),
    (dict(mode="dual-reference", switch_min=0.9, switch_max=0.1), "switch_min <= switch_max"),
    (dict(mode="dual-reference", custom_weight=0.0), "custom_weight and style_weight must be > 0"),
    (dict(lam=0.5, retouch_start=0.2), "retouch_start (0.2) must be >= lam (0.5)"),
    (dict(mode="layout", style_shift=0.5), "style_shift is an option of mode 'dual-reference'"),
    (dict(mode="personalized", custom_weight=2.0), "custom_weight is an option of mode 'dual-reference'"),
    (dict(mode="dual-reference", scheduler="euler"), "needs scheduler 'ddim'"),
    (dict(alpha=0.5), "'alpha' is now 'sam_weight' (options.retouch.sam_weight)"),
    (dict(tau=0.5), "'tau' is now 'mask_threshold' (options.retouch.mask_threshold)"),
    (dict(lamda=0.5), "'lamda' is not a generation option"),
])
def test_bad_fields_are_refused_naming_the_option(fields, words):
    with pytest.raises(InferenceError) as err:
        GenerationOptions.of(**fields)
    assert words in str(err.value)


def test_groups_given_as_dicts_become_their_dataclasses():
    options = GenerationOptions(mode="layout", layout={"lam": 0.25}, retouch={"swap_levels": 1})
    assert options.layout == LayoutOptions(lam=0.25) and options.retouch.swap_levels == 1


def test_moved_keys_name_the_place_now():
    moved = moved_keys()
    assert moved["options.lam"] == "options.layout.lam"
    assert moved["options.alpha"] == "options.retouch.sam_weight"
    assert moved["options.retouch.tau"] == "options.retouch.mask_threshold"
    assert moved["options.layout.style_reference"] == "options.dual_reference.style_reference"
    assert "options.mode" not in moved


@pytest.mark.parametrize("argv, line", [
    (["--options.alpha", "0.3"], "option --options.alpha is now --options.retouch.sam_weight"),
    (["--options.lam", "0.3"], "option --options.lam is now --options.layout.lam"),
    (["--options.style_reference", "s.png"], "option --options.style_reference is now "
                                              "--options.dual_reference.style_reference"),
])
def test_the_cli_names_the_new_place_of_a_moved_option(argv, line, capsys):
    code, err = run_cli(["generate", "--concept", "x", "--prompt", "a {}", *argv], capsys)
    assert code == 2 and len(err) == 1 and line in err[0]


def test_a_yaml_with_old_keys_names_the_new_place(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("options:\n  mode: layout-retouch\n  lam: 0.3\n  tau: 0.4\n")
    code, err = run_cli(["generate", "--concept", "x", "--prompt", "a {}", "--config", str(config)], capsys)
    assert code == 2 and len(err) == 1 and "key options.lam is now options.layout.lam" in err[0]


def _float_fields() -> list[str]:
    """Every float field of the options and their groups, by bare name."""
    classes = [GenerationOptions, *GROUPS.values()]
    return [f.name for cls in classes for f in dataclasses.fields(cls) if "float" in str(f.type)]


@pytest.mark.parametrize("name", _float_fields())
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_option_is_refused_when_not_finite(name, value):
    mode = "dual-reference" if field_group(name) == "dual_reference" else "layout-retouch"
    with pytest.raises(InferenceError, match=rf"^{name} must be a finite number, got {value}"):
        GenerationOptions.of(mode=mode, **{name: value})


def test_a_negative_eta_is_refused():
    with pytest.raises(InferenceError, match="eta must be >= 0"):
        GenerationOptions.of(eta=-0.5)


def test_a_non_finite_option_in_a_yaml_is_one_line_on_the_cli(tmp_path, capsys):
    config = tmp_path / "inf.yaml"
    config.write_text("options:\n  guidance_scale: .inf\n  layout: {lam: .nan}\n")
    code, err = run_cli(["generate", "--concept", str(tmp_path / "none"), "--prompt", "a {}", "--config", str(config)],
                        capsys)
    assert code == 2 and len(err) == 1 and "must be a finite number" in err[0], err
