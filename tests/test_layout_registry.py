"""Checkpoint layouts are registry entries that recognise a file from its tensor names alone: the header-only
pre-flight checks and the loaders ask the same entries, a new layout is one class plus one registry line,
and every "does it fit" refusal comes from one function."""
import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint_layouts import KW, files  # noqa: F401  (the fixture of every released layout)

from mcf_fast.model.checkpoints import check_fit, load_into, misfit_text, unwrap_keys
from mcf_fast.model.headers import checkpoint_keys
from mcf_fast.model.layouts import LAYOUTS, Take, load_vit, open_checkpoint, read_names, read_parts
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.vit import VisionTransformer, save_encoder
from mcf_fast.train import checks


def _header_reading(path):
    return read_names(unwrap_keys(checkpoint_keys(str(path))), {"path": str(path)})


@pytest.mark.parametrize("name", ["reference", "reference_proj", "reference_ddp", "mae", "moco"])
def test_header_reading_equals_the_loaded_reading(files, name):  # noqa: F811
    """From the header alone, each layout gets the same label and the same names, in the file's order, for
    every sub-network as from the loaded tensors."""
    path = files[3][name]
    ck = open_checkpoint(str(path))
    r = _header_reading(path)
    assert r.label == ck.layout
    assert {p: list(names) for p, names in r.parts.items() if names} == {p: list(sd) for p, sd in ck.parts.items()}
    enc = ck.parts["online_encoder"]
    assert list(enc)[:3] == ["cls_token", "pos_embed", "patch_embed.proj.weight"]  # as the model saved them


def test_mcf_fast_files_read_from_headers(tmp_path):
    """Our own files (a model state dict, an export) are recognised from their safetensors headers too."""
    model = MCFModel(**KW)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    st, _ = save_encoder(model.encoder, str(tmp_path / "export"))
    assert _header_reading(tmp_path / "model.safetensors").label == "mcf_fast model state dict"
    assert open_checkpoint(st).layout == "mcf_fast encoder export"
    assert set(_header_reading(st).parts["online_encoder"]) == set(model.encoder.state_dict())


def test_teacher_depth_follows_the_part_the_loader_takes(files):  # noqa: F811
    """The pre-flight depth of a reference-code file is its teacher's (4 blocks), as the teacher loader
    picks it; FILE#PART asks for that part (the online encoder has 2)."""
    paths = files[3]
    assert checks.teacher_depth(str(paths["reference"])) == 4
    assert checks.teacher_depth(str(paths["reference"]), "online_encoder") == 2
    assert checks.teacher_depth(str(paths["moco"])) == 2


class StudentTeacherLayout:
    """A toy layout (DINO-style `student.backbone.*` / `teacher.backbone.*`): one class, one registry line."""
    name, generic = "student_teacher", False
    summary = "this test's toy layout: student.backbone.* and teacher.backbone.*"

    @staticmethod
    def read(keys, meta):
        if "student.backbone.patch_embed.proj.weight" not in keys:
            return None
        return read_parts("student/teacher checkpoint", keys, {
            "online_encoder": Take("student.backbone.", drop_head=True),
            "target_encoder": Take("teacher.backbone.", drop_head=True)}, ("student.", "teacher."))


def test_toy_layout_loads_everywhere(tmp_path):
    """A registered layout is recognised by the loaders (both sub-networks, heads dropped) and by the
    header-only depth check; unregistered, the same file is an unknown layout."""
    torch.manual_seed(3)
    s = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)
    t = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)
    sd = {**{f"student.backbone.{k}": v for k, v in s.state_dict().items()},
          **{f"teacher.backbone.{k}": v for k, v in t.state_dict().items()},
          "student.backbone.head.weight": torch.zeros(4, 16)}
    path = str(tmp_path / "st.pth")
    torch.save({"state_dict": sd, "epoch": 7}, path)
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        open_checkpoint(path)
    with LAYOUTS.registered(StudentTeacherLayout):
        vit, text, ck = load_vit(path, num_heads=2)
        tgt, _, _ = load_vit(path + "#target_encoder", num_heads=2)
        assert text.startswith("student/teacher checkpoint") and ck.dropped == ["student.backbone.head.weight"]
        assert torch.equal(vit.blocks[2].mlp.fc2.weight, s.blocks[2].mlp.fc2.weight)
        assert torch.equal(tgt.blocks[2].mlp.fc2.weight, t.blocks[2].mlp.fc2.weight)
        assert checks.teacher_depth(path) == 3
    assert checks.teacher_depth(path) is None


def test_one_fit_check_names_every_kind_of_misfit():
    """check_fit reports missing, unexpected and mis-shaped names in one line; load_into uses it and copies
    nothing on a misfit."""
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    got = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    with pytest.raises(ValueError) as e:
        check_fit(own, got, "file x")
    msg = str(e.value)
    assert msg == ("file x does not fit the model: missing ['c']; unexpected ['d']; "
                   "shape mismatch ['b: file (4,) vs model (3,)']")
    check_fit(own, {"a": (2,), "b": (3,)}, "shapes", ignore_missing=("c",))  # shapes stand for tensors
    assert misfit_text([], [], []) == ""
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    bad = {k: torch.ones_like(v) for k, v in vit.state_dict().items()}
    bad["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.extra'\]"):
        load_into(vit, bad, "bad.pth")
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())
