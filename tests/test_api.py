"""The public API: names that cannot be shadowed, visible to editors, one calling convention."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import warnings

import pytest

import emoscope as es


def _submodules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(es.__path__, "emoscope.")]


def test_no_public_name_is_also_a_submodule_name():
    tops = {name.split(".")[1] for name in _submodules()}
    assert not tops & set(es.__all__), tops & set(es.__all__)


def test_importing_every_submodule_leaves_the_public_names_alone():
    # A fresh interpreter: the first access happens before and after importing everything.
    code = (
        "import importlib, inspect, pkgutil, emoscope as es\n"
        "before = {n: getattr(es, n) for n in es.__all__}\n"
        "for m in pkgutil.walk_packages(es.__path__, 'emoscope.'):\n"
        "    importlib.import_module(m.name)\n"
        "after = {n: getattr(es, n) for n in es.__all__}\n"
        "bad = [n for n in before if before[n] is not after[n]]\n"
        "assert not bad, bad\n"
        "assert callable(es.extract) and not inspect.ismodule(es.extract)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dir_lists_the_api_and_every_name_resolves():
    listed = dir(es)
    for name in es.__all__:
        assert name in listed
        assert getattr(es, name) is not None
    with pytest.raises(AttributeError):
        es.no_such_thing  # noqa: B018


def test_the_old_class_name_still_works_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls = es.EmotionVectors
    assert cls is es.EmotionBank
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


@pytest.mark.parametrize(
    ("owner", "method", "data"),
    [
        ("emoscope.monitor:Monitor", "__init__", ["lm", "bank"]),
        ("emoscope.monitor:Monitor", "generate", ["prompts"]),
        ("emoscope.monitor:Monitor", "stream", ["prompts"]),
        ("emoscope.steer:Steerer", "__init__", ["lm", "bank"]),
        ("emoscope.steer:Steerer", "generate", ["prompts"]),
        ("emoscope.steer:Steerer", "generate_rows", ["batch"]),
        ("emoscope.analysis.steering_checks:validate_steering", None, ["steerer"]),
        ("emoscope.analysis.steering_checks:dose_response", None, ["steerer"]),
        ("emoscope.analysis.steering_checks:feeling_test", None, ["steerer"]),
        ("emoscope.readouts:UserReader", "__init__", ["lm", "bank"]),
        ("emoscope.readouts:UserReader", "for_bank", ["lm", "bank"]),
        ("emoscope.analysis.speaker_steering:speaker_steering", None, ["lm", "bank"]),
    ],
)
def test_options_are_keyword_only_after_the_data(owner, method, data):
    module, name = owner.split(":")
    target = getattr(importlib.import_module(module), name)
    fn = getattr(target, method) if method else target
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == data, (owner, method, positional)


def test_steering_takes_one_layer_or_a_band(tiny_lm):
    from conftest import synthetic_bank
    from emoscope.steer import Steering, steering_layers

    bank = synthetic_bank(tiny_lm("llama"))
    assert steering_layers(bank, Steering({"happy": 0.1}, layers=2)) == [2]
    assert steering_layers(bank, Steering({"happy": 0.1}, layers=[1, 2])) == [1, 2]
    with pytest.raises(es.EmoscopeError, match="layer"):
        Steering({"happy": 0.1}, layers=[])


def test_one_default_steering_layer_for_every_caller(tiny_lm, tmp_path):
    """Steering(layers=None), export and the steering checks all use bank.steer_layer."""
    import dataclasses

    from conftest import synthetic_bank
    from emoscope.export import export_emotions, read_control_vector
    from emoscope.steer import Steering, steering_layers

    lm = tiny_lm("llama")
    base = synthetic_bank(lm, layers=(1, 2, 3))
    # readout layer 3, steering layer 1: the two must not be confused anywhere
    bank = dataclasses.replace(base, manifest=dict(base.manifest, default_layer=3, steer_layer=1))
    assert bank.default_layer == 3 and bank.steer_layer == 1
    assert steering_layers(bank, Steering({"happy": 0.1})) == [1]
    path = export_emotions(bank, tmp_path / "h.gguf", {"happy": 0.1})
    assert set(read_control_vector(path)) == {1}
    from emoscope.analysis.steering_checks import feeling_test
    from emoscope.steer import Steerer

    assert feeling_test(Steerer(lm, bank), emotions=["happy", "sad"])["layers"] == [1]
