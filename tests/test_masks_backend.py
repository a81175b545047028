"""Mask backends are chosen once: the environment is read on first use only, a generator keeps the
backend it was built with, refusals are one line naming the fix, and an automatic fallback says so once."""
import logging

import pytest
import torch

from mcf_fast import mask_algo as algo
from mcf_fast import masking as mk


@pytest.fixture
def fresh(monkeypatch):
    """Module state as in a new process: no default read yet, nothing warned."""
    monkeypatch.setattr(mk, "_DEFAULT", None)
    monkeypatch.setattr(mk, "_WARNED", set())
    monkeypatch.delenv(mk.ENV_BACKEND, raising=False)
    return monkeypatch


@pytest.fixture
def no_extension(fresh):
    """mcf_fast._C as if it could not be imported."""
    fresh.setattr(mk, "_EXT", False)
    fresh.setattr(mk, "_EXT_ERROR", "simulated: no _C here")
    return fresh


@pytest.fixture
def torch_calls(monkeypatch):
    """Counts calls of the torch integer path of uniform masks."""
    calls = []
    real = algo.uniform_masks
    monkeypatch.setattr(algo, "uniform_masks", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    return calls


def test_environment_is_read_once(fresh, torch_calls):
    """MCF_FAST_MASKS is read on first use; changing it later changes neither the default nor a
    generator, and a value that would be refused is never read again."""
    pytest.importorskip("mcf_fast._C")
    fresh.setenv(mk.ENV_BACKEND, "torch")
    gen = mk.MaskGenerator("uniform", 7, 0.75, seed=0)
    assert gen.backend == "torch" and mk.default_backend() == "torch"
    fresh.setenv(mk.ENV_BACKEND, "fast")  # a bad value: refused if it were read again
    first = gen(4, step=1)
    again = mk.random_masks(4, 49, 0.75, views=2, seed=0, step=1)
    assert mk.default_backend() == "torch" and len(torch_calls) == 2
    for x, y in zip(first, again):
        assert torch.equal(x, y)


def test_bad_environment_value_is_one_line(fresh):
    """An unknown MCF_FAST_MASKS names itself and the choices, and config checks say it in one line."""
    fresh.setenv(mk.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match=r"MCF_FAST_MASKS='fast': the mask backend must be one of auto, ext, torch"):
        mk.default_backend()
    from mcf_fast.train.config import from_preset
    with pytest.raises(ValueError) as e:
        from_preset("demo").validate()
    assert "MCF_FAST_MASKS='fast'" in str(e.value) and "\n" not in str(e.value)


def test_argument_beats_the_default_and_backends_agree(fresh, torch_calls):
    """backend= chooses per generator whatever the default; 'ext' and 'torch' give the same bits."""
    pytest.importorskip("mcf_fast._C")
    fresh.setenv(mk.ENV_BACKEND, "torch")
    ext = mk.MaskGenerator("uniform", 14, 0.75, seed=5, backend="ext")
    auto = mk.MaskGenerator("uniform", 14, 0.75, seed=5, backend="auto")
    assert (ext.backend, auto.backend) == ("ext", "ext")
    ids = torch.arange(40, 72)
    a = ext(32, step=3, sample_ids=ids)
    assert not torch_calls
    b = mk.MaskGenerator("uniform", 14, 0.75, seed=5)(32, step=3, sample_ids=ids)  # the default: torch
    assert len(torch_calls) == 1
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ext_without_extension_is_one_line_naming_the_fix(no_extension):
    """Asking for 'ext' when mcf_fast._C is missing: one line with the import error and the build command,
    as a RuntimeError from the generator and as a ValueError from the config checks."""
    with pytest.raises(RuntimeError) as e:
        mk.MaskGenerator("uniform", 14, 0.75, seed=0, backend="ext")
    msg = str(e.value)
    assert "\n" not in msg and "simulated: no _C here" in msg and "pip install -v --no-build-isolation -e ." in msg
    assert msg.startswith("backend='ext' cannot draw uniform masks on cpu")
    no_extension.setenv(mk.ENV_BACKEND, "ext")
    with pytest.raises(ValueError, match=r"^MCF_FAST_MASKS=ext: mcf_fast._C cannot be imported .*pip install"):
        mk.UniformMasks.precheck(type("M", (), {"img_size": 64, "patch_size": 8})())


def test_cuda_without_cuda_build_names_the_fix(fresh):
    """'ext' on a CUDA device with a CPU-only _C is refused with the CUDA build command."""
    fresh.setattr(mk, "_EXT", type("CpuOnly", (), {"WITH_CUDA": 0})())
    with pytest.raises(RuntimeError, match="built without CUDA; fix: `MCF_FAST_BUILD_CUDA=1 pip install"):
        mk.choose_backend(mk.UniformMasks, torch.device("cuda", 0), "ext")
    assert mk.choose_backend(mk.UniformMasks, torch.device("cpu"), "ext") == "ext"


def test_automatic_fallback_is_logged_once(no_extension, caplog):
    """Without mcf_fast._C, 'auto' takes the torch path (same masks) and the log says so once, however
    many generators and calls follow."""
    want = algo.uniform_masks(torch.arange(4), 196, 49, 2, 0, 3)
    with caplog.at_level(logging.WARNING, logger="mcf_fast.masking"):
        gens = [mk.MaskGenerator("uniform", 14, 0.75, seed=0) for _ in range(2)]
        outs = [g(4, step=3) for g in gens for _ in range(3)]
        outs.append(mk.random_masks(4, 196, 0.75, views=2, seed=0, step=3))
    assert [g.backend for g in gens] == ["torch", "torch"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "uniform masks on cpu use the torch integer ops" in lines[0]
    for out in outs:
        assert all(torch.equal(x, y) for x, y in zip(out, want))


def test_kind_without_compiled_op(fresh, caplog):
    """Block masks have no compiled op: 'auto' takes torch silently (by design, not a fallback), and
    'ext' is refused with the reason."""
    with caplog.at_level(logging.WARNING, logger="mcf_fast.masking"):
        assert mk.MaskGenerator("block", 14, 0.75, seed=0).backend == "torch"
    assert not caplog.records
    with pytest.raises(RuntimeError, match="mask kind 'block' has no compiled op.*pass backend='auto' or 'torch'"):
        mk.MaskGenerator("block", 14, 0.75, seed=0, backend="ext")


def test_unknown_backend_argument(fresh):
    """A backend name that does not exist is refused with the choices."""
    with pytest.raises(ValueError, match="backend='fast': the mask backend must be one of auto, ext, torch"):
        mk.MaskGenerator("uniform", 14, 0.75, seed=0, backend="fast")
