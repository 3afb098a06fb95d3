"""The family registries agree: the adapter registry, the demos (``fora_export.demo``,
``fora_export.demo_pipelines``), the test suite's family table, and each adapter's declared
``forward_signature`` against the diffusers model's real ``forward``."""

from __future__ import annotations

import inspect

import pytest

from fora_export.adapters.registry import adapter_class_for, adapter_for
from fora_export.loading import load_model
from tests.conformance.registries import (
    build_option_choices,
    demo_model_factories,
    demo_pipeline_names,
    registered_adapters,
)
from tests.tiny_models import TINY_FAMILIES

FAMILIES = sorted(registered_adapters())

#: Disagreements this suite found that are not fixed yet: family -> why (strict xfails:
#: the fix makes them fail until the entry is removed).
KNOWN_SIGNATURE_BUGS: dict[str, str] = {}


def test_every_registered_family_has_one_tiny_test_model() -> None:
    assert sorted(TINY_FAMILIES) == FAMILIES, (
        "add the family's tiny model to tests/tiny_models.TINY_FAMILIES (or remove a stale entry)"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_model_is_the_family_with_every_kind(family: str) -> None:
    """Made by the family's demo factory, the tiny model is the registered class, and every
    kind the family caches occurs in it (the conformance matrix covers each)."""
    tiny = TINY_FAMILIES[family]
    model = demo_model_factories()[tiny.demo](tiny.config, seed=tiny.seed)
    adapter = adapter_for(model)
    assert type(adapter) is registered_adapters()[family] and adapter.family == family
    assert {point.kind for point in adapter.cache_points()} == set(adapter.cache_kinds)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_builds_leave_every_kind_out_once(family: str) -> None:
    """Where the exporter drops graph inputs nothing reads (TorchScript: a cache a graph
    does not take disappears from its IO), the real plain builds leave every kind out once;
    a dynamo family keeps every input, so the contract level (every subset) checks its plain
    graphs and its default real build that the exported IO is the module's."""
    from fora_export.adapters.registry import family_spec
    from tests.conformance.contract import KEEPS_UNUSED_INPUTS

    kinds = set(registered_adapters()[family].cache_kinds)
    builds = [set(subset) for subset in TINY_FAMILIES[family].plain_builds]
    assert all(subset and subset <= kinds for subset in builds)
    if not KEEPS_UNUSED_INPUTS[family_spec(family).exporter]:
        assert builds and all(any(kind not in subset for subset in builds) for kind in kinds)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_demo_model_and_a_demo_pipeline(family: str) -> None:
    demo = TINY_FAMILIES[family].demo
    assert demo in demo_model_factories()
    assert demo in demo_pipeline_names(), f"no built-in pipeline {demo} for `fora-export sample`"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_pipeline_loads_as_its_family(family: str, request: pytest.FixtureRequest) -> None:
    """The tiny diffusers pipeline made with the family's demo_pipelines factory (the
    ``<family>_pipeline_dir`` fixture) loads as the family's model class."""
    folder = request.getfixturevalue(f"{family}_pipeline_dir")
    loaded = load_model(str(folder))
    assert adapter_class_for(loaded.class_name) is registered_adapters()[family]


def signature_marks(family: str) -> list[pytest.MarkDecorator]:
    reason = KNOWN_SIGNATURE_BUGS.get(family)
    return [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []


@pytest.mark.parametrize("family", [pytest.param(f, marks=signature_marks(f)) for f in FAMILIES])
def test_forward_signature_is_the_models_forward(family: str) -> None:
    """The declared parameters are the real forward's in order (positional calls are mapped by
    them), and every real parameter is either fed or refused (none ignored silently)."""
    import diffusers

    adapter = registered_adapters()[family]
    real = [name for name in inspect.signature(getattr(diffusers, adapter.model_class).forward).parameters]
    real = real[1:]  # self
    declared = adapter.forward_signature
    assert list(declared.parameters) == real[: len(declared.parameters)]
    assert set(declared.nested) <= set(declared.parameters)
    assert set(declared.unsupported) <= set(real)
    assert set(real) - {"return_dict"} <= set(declared.parameters) | set(declared.unsupported)


def test_the_reuse_graph_choices_are_what_builds_accept() -> None:
    from fora_export.builder.config import BuildConfig
    from fora_export.errors import ConfigError

    choices = build_option_choices("reuse-graph")
    assert set(choices) == {"lean", "plain"}
    for choice in choices:
        assert BuildConfig.from_options(reuse_graph=choice).reuse_graph == choice
    with pytest.raises(ConfigError, match="--reuse-graph"):
        BuildConfig.from_options(reuse_graph="fast")
