"""Pass specs are parsed and validated before any model is loaded."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from onnx_shrink.compiler import spec
from onnx_shrink.errors import PipelineSpecError
from onnx_shrink.passes.fold import FoldPass
from tests.helpers import parse


def test_names_and_sets_build_configured_passes():
    (fold,) = spec.parse_spec("fold", ["fold.max_growth_bytes=1_024", "fold.inline-functions=yes"])
    assert fold == FoldPass(max_growth_bytes=1024, inline_functions=True)


def test_pass_instances_pass_through_unchanged():
    configured = FoldPass(iterations=5)
    assert spec.parse_spec([configured, "fold"]) == (configured, FoldPass())


@pytest.mark.parametrize(
    ("passes", "sets", "message"),
    [
        ("fold,frobnicate", [], "unknown pass 'frobnicate'; available passes: equalize, fold"),
        ("fold", ["fold.sparsity=0.5"], "pass 'fold' has no option 'sparsity'; its options are: "),
        ("fold", ["fold.max_growth_bytes=lots"], "fold.max_growth_bytes: expected int, got 'lots'"),
        ("fold", ["fold.max_growth_bytes=-1"], "max_growth_bytes=-1 is below the minimum 0"),
        ("fold", ["fold.iterations=2.5"], "fold.iterations: expected int"),
        ("fold", ["fold.inline_functions=maybe"], "expected bool"),
        ("fold", ["fold=1"], "--set expects PASS.OPTION=VALUE"),
        ("fold", ["sparsify.sparsity=0.5"], "unknown pass 'sparsify'"),
        ("fold", ["quant.calibration=mse"], "options are given for pass 'quant', which is not"),
        ("", [], "no passes given"),
    ],
)
def test_bad_specs_name_the_problem_and_the_choices(passes, sets, message):
    with pytest.raises(PipelineSpecError, match=None) as info:
        spec.parse_spec(passes, sets)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("passes", "setting", "message"),
    [
        ("prune", "prune.ridge=nan", "ridge=nan is not a number"),
        ("prune-channels", "prune-channels.ratio=nan", "ratio=nan is not a number"),
        ("quant", "quant.percentile=NaN", "percentile=nan is not a number"),
        ("lowrank", "lowrank.damping=nan", "damping=nan is not a number"),
        ("prune", "prune.ridge=inf", "ridge=inf must be finite"),
        ("lowrank", "lowrank.max_error=inf", "max_error=inf must be finite"),
    ],
)
def test_nan_and_inf_are_refused_where_they_mean_nothing(passes, setting, message):
    """Range checks are False for NaN, and inf passed a missing maximum: prune.ridge=nan
    wrote NaN weights, lowrank.damping=nan failed deep in an SVD."""
    with pytest.raises(PipelineSpecError) as info:
        spec.parse_spec(passes, [setting])
    assert message in str(info.value)


def test_a_time_budget_may_be_infinite():
    prune, lowrank = spec.parse_spec(
        "prune,lowrank",
        ["prune.reconstruct=on", "prune.refit_seconds=inf", "lowrank.probe_seconds=inf"],
    )
    assert prune.refit_seconds == lowrank.probe_seconds == float("inf")
    assert lowrank.probe_budget() is None  # measured whole, as with no budget


def test_recipe_gives_passes_and_options_and_set_overrides_it(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('passes = ["fold"]\n[fold]\nmax_growth_bytes = 100\niterations = 4\n')
    (fold,) = spec.parse_spec(None, ["fold.iterations=6"], recipe)
    assert fold == FoldPass(max_growth_bytes=100, iterations=6)
    # --passes replaces the recipe's list; its [fold] table then names a pass not run
    with pytest.raises(PipelineSpecError, match="--passes replaces the recipe's passes"):
        spec.parse_spec("quant-dynamic", [], recipe)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("passes = [", "not valid TOML"),
        ('passes = "fold"', "'passes' must be a list of pass names"),
        ('passes = ["fold"]\nverbose = true', "unexpected top-level key 'verbose'"),
        ('passes = ["fold"]\n[fold]\nmax_growth_bytes = "big"', "expected int, got 'big'"),
        ('passes = ["fold"]\n[sparsify]\nsparsity = 0.5', "unknown pass 'sparsify'"),
        ('passes = ["quant"]\n[quant.exclude]\nConv = 1', "expected list of str, got {'Conv': 1}"),
    ],
)
def test_bad_recipes_are_rejected(tmp_path, text, message):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    with pytest.raises(PipelineSpecError) as info:
        spec.parse_spec(None, [], recipe)
    assert message in str(info.value)


def test_recipes_in_utf8_with_a_byte_order_mark_are_read_and_other_encodings_are_one_line(
    tmp_path,
):
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(b'\xef\xbb\xbfpasses = ["fold"]\n')  # as Windows Notepad saves it
    assert spec.parse_spec(None, [], recipe) == (FoldPass(),)
    recipe.write_bytes('passes = ["fold"]  # café\n'.encode("latin-1"))
    with pytest.raises(PipelineSpecError, match=r"recipe.toml: not UTF-8 text \(byte 24 is 0xe9\)"):
        spec.parse_spec(None, [], recipe)


def test_describe_shows_only_changed_options():
    assert spec.describe(FoldPass()) == "fold"
    assert spec.describe(FoldPass(max_growth_bytes=8)) == "fold(max_growth_bytes=8)"


@dataclasses.dataclass(frozen=True)
class MaskPass:
    """A user's pass configured with an array, as custom passes are (masks, tables)."""

    name = "mask"
    mask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
    label: str = "m"


def test_describe_takes_array_options_by_their_type():
    # An array's ``!=`` is elementwise: comparing it with its default raised ValueError and
    # failed the run of any pass holding one.
    assert spec.describe(MaskPass()) == "mask"  # its default, made by a factory
    assert spec.describe(MaskPass(mask=np.zeros(3))) == "mask"
    assert spec.describe(MaskPass(mask=np.ones((3, 3)))) == "mask(mask=<ndarray>)"  # 3 lines
    assert (
        spec.describe(MaskPass(mask=np.ones(2), label="n"))
        == "mask(mask=array([1., 1.]), label='n')"
    )


def test_describe_gives_a_long_exclude_list_in_full():
    from onnx_shrink.passes.quant.static import QuantPass

    names = tuple(f"/backbone/stage{i}/conv{j}/Conv" for i in range(4) for j in range(3))
    assert spec.describe(QuantPass(exclude=names)) == f"quant(exclude={names!r})"


def test_pass_repr_is_its_full_configuration():
    assert repr(FoldPass(iterations=4)).startswith("FoldPass(max_growth_bytes=0,")
    assert "iterations=4" in repr(FoldPass(iterations=4))


def test_passes_are_frozen():
    with pytest.raises(AttributeError):
        FoldPass().iterations = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    "option",
    [
        "quant.exclude",
        "quant.int16",
        "quant-dynamic.exclude",
        "quant-weight.exclude",
        "fp16.exclude",
        "prune.exclude",
        "prune-channels.exclude",
        "lowrank.exclude",
        "lowrank.only",
    ],
)
@pytest.mark.parametrize("pattern", ["[", "conv(1"])
def test_a_name_or_regex_option_that_does_not_compile_is_a_spec_error(option, pattern):
    """Every option of node names or regexes is checked when the pipeline is parsed, with the
    escaped form that would match the name as written."""
    pass_name = option.split(".")[0]
    with pytest.raises(PipelineSpecError) as info:
        spec.parse_spec(pass_name, [f"{option}={pattern}"])
    message = str(info.value)
    assert f"{pattern!r} is not a regular expression" in message
    assert f"escape it: {re.escape(pattern)}" in message


def test_every_name_or_regex_option_is_checked():
    """An option whose doc says it takes regexes is declared with patterns=True."""
    from onnx_shrink.compiler.registry import REGISTRY

    for name, pass_class in REGISTRY.items():
        for field in dataclasses.fields(pass_class):
            doc = field.metadata.get("doc", "")
            if "regex" in doc or "regular expression" in doc:
                assert field.metadata.get("patterns"), f"{name}.{field.name}"


MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
    w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
    y = MatMul (x, w)
}
"""


@pytest.mark.parametrize(
    "setting",
    ['fp16.block_ops=["CumSum"', "quant.exclude_op_types=Conv(", "quant.only=dense(1"],
)
def test_exact_name_options_take_any_text_and_a_typo_is_a_warning(setting, caplog):
    """Op types and quant.only match names exactly: an item that is no regex is a name that
    matches nothing, said as such (it was an internal error, exit 4)."""
    from onnx_shrink.compiler import io
    from onnx_shrink.runtime_check import collect, data

    model = io.load(parse(MATMUL))
    (pass_,) = spec.parse_spec(setting.split(".")[0], [setting])
    dataset = data.prepare(data.specs_from_model(model), None)
    with caplog.at_level("WARNING"):
        pass_.bind(collect.collect(model, pass_.requests(model), dataset))(model)
    item = setting.split("=", 1)[1]
    assert f"{item!r} matches no" in caplog.text


def test_sets_may_be_one_string_and_must_be_strings():
    (fold,) = spec.parse_spec("fold", "fold.iterations=6")
    assert fold == FoldPass(iterations=6)
    with pytest.raises(PipelineSpecError, match="expected a list of 'pass.option=value'"):
        spec.parse_spec("fold", {"fold.iterations": 6})  # type: ignore[arg-type]


def test_an_option_set_twice_is_refused_rather_than_the_last_winning():
    with pytest.raises(PipelineSpecError, match="quant.exclude is set twice"):
        spec.parse_spec("quant", ["quant.exclude=a", "quant.exclude=b"])


def test_list_passes_shows_each_options_bounds():
    from onnx_shrink.compiler.options import option_infos
    from onnx_shrink.passes.quant.static import QuantPass

    bins = next(i for i in option_infos(QuantPass) if i.name == "bins")
    assert bins.type_name == "int in [128, 8000]"
