"""The generic registry every variation point uses: one name, one entry; unknown names say the choices."""
import pytest

from mcf_fast.registry import Registry


class _Kind:
    name = "toy"
    summary = "a toy kind"


def test_register_get_and_names():
    """An entry registered once is found by name and listed in order."""
    reg = Registry("widget", "--x.widget")
    reg.register(_Kind)
    assert reg.get("toy") is _Kind and "toy" in reg and reg.names() == ("toy",) and len(reg) == 1


def test_unknown_name_lists_choices_and_suggests():
    """A misspelt name is one ValueError naming the option, the choices and the closest one."""
    reg = Registry("widget", "--x.widget")
    reg.register(_Kind)
    with pytest.raises(ValueError, match=r"--x.widget 'tyo': unknown widget \(did you mean 'toy'\?\); choose one of toy"):
        reg.get("tyo")


def test_a_name_is_declared_once():
    """Registering another entry under a taken name is refused (kinds are declared once)."""
    reg = Registry("widget", "--x.widget")
    reg.register(_Kind)
    reg.register(_Kind)  # the same entry again is harmless
    with pytest.raises(ValueError, match="already registered"):
        reg.register(type("Other", (), {"name": "toy"}))


def test_registered_context_removes_the_toy_afterwards():
    """`registered` adds a kind for a block only (how tests add toy kinds)."""
    reg = Registry("widget", "--x.widget")
    with reg.registered(_Kind):
        assert "toy" in reg
    assert "toy" not in reg


def test_choices_describe_themselves():
    """A choice set is a registry of names with summaries; describe() is the help text, get() the check."""
    from mcf_fast.registry import choices
    reg = choices("resize", "--x.resize", {"bilinear": "only when sizes differ", "nearest": "always"})
    assert reg.describe() == "'bilinear' (only when sizes differ) or 'nearest' (always)"
    assert reg.get("nearest").summary == "always" and "bilinear" in reg
    with pytest.raises(ValueError, match=r"--x.resize 'bicubic': unknown resize; choose one of bilinear, nearest"):
        reg.get("bicubic")
