"""What a checkpoint or export holds, read from its header only: no tensor is loaded, no code runs.

The pre-flight checks ask these before anything is built or written (a teacher's depth against
`--model.teacher_layers`, the decoder blocks of a `--model.decoder_init` file, an `encoder.json`
against its weights), so a wrong file costs a header read, not a model build.
  checkpoint_keys(path)      tensor names of a .safetensors or zip-format torch file (nested dicts
                             flattened with dots); a .pth pickle is walked with a stub unpickler
  safetensors_shapes(path)   {name: shape} from a safetensors header
  read_small_json(path)      a small JSON file (encoder.json, config.json), read bounded
"""
from __future__ import annotations

import io
import json
import os
import pickle
import stat
import zipfile

# A config.json or encoder.json is a few KB; 1 MiB leaves room for any hand-written one and stops a
# device or a huge file from being read into memory.
MAX_JSON_BYTES = 1 << 20


# ---------------------------------------------------------------------- safetensors
def safetensors_header(path: str) -> dict:
    """The JSON header of a .safetensors file (without `__metadata__`), read bounded by
    `safe_load.safetensors_header`; a RefusedFile (a ValueError, one line) when it is not one."""
    from mcf_fast.safe_load import safetensors_header as checked
    header = dict(checked(path))
    header.pop("__metadata__", None)
    return header


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a .safetensors file, from its header."""
    out = {}
    for k, v in safetensors_header(path).items():
        shape = v.get("shape") if isinstance(v, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{path!r}: tensor {k!r} has no valid shape in the safetensors header")
        out[k] = tuple(shape)
    return out


# ---------------------------------------------------------------------- torch zip checkpoints (no torch)
class _Stub:
    """Stands for any class or tensor in a pickled state dict: accepts every call and state."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Stub()

    def __setstate__(self, state):
        pass


class _Dict(dict):
    """An OrderedDict stand-in that takes the attributes torch pickles with a state dict (_metadata)."""


class _KeysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")):
            return _Dict
        return _Stub  # tensors, storages, Namespaces...: never constructed for real, no code runs

    def persistent_load(self, pid):
        return None


def checkpoint_keys(path: str) -> list[str] | None:
    """Tensor names of a .safetensors or zip-format torch checkpoint from its header / pickle only
    (nested {'state_dict'|'model': ...} flattened with dots); None when the format is not recognised.
    The pickle is walked first (`pickle_bounds`: a bomb is a RefusedFile, one line) and read from the
    record torch.load would read (PREFIX/data.pkl, PREFIX named by the first record)."""
    if path.endswith(".safetensors"):
        return list(safetensors_header(path))
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04" or not zipfile.is_zipfile(path):  # torch's own test for its zip reader
            return None
    from mcf_fast.pickle_bounds import RefusedFile
    from mcf_fast.safe_load import check_torch_file
    check_torch_file(path)  # stored records only, PREFIX/data.pkl walked: a RefusedFile line otherwise
    with zipfile.ZipFile(path) as z:
        with z.open(z.namelist()[0].split("/", 1)[0] + "/data.pkl") as fh:
            data = fh.read()
    try:
        obj = _KeysOnly(io.BytesIO(data)).load()
    except Exception as e:  # stubs make any class "build"; what is left is a damaged stream
        raise RefusedFile(f"{path!r}: its pickle does not read ({type(e).__name__}); re-save it with torch.save") from None
    keys: list[str] = []

    def walk(d, pre):
        for k, v in d.items():
            if isinstance(v, dict) and len(pre) < 64:
                walk(v, f"{pre}{k}.")
            elif isinstance(k, str):
                keys.append(pre + k)
    if isinstance(obj, dict):
        walk(obj, "")
    return keys


# ---------------------------------------------------------------------- files the run will read
def check_input_file(option: str, path: str, what: str) -> None:
    """A file a run will read: it exists and is a regular file (or an export folder holding
    encoder.safetensors); a device or a FIFO would be read forever. ValueError naming `--option`."""
    if not os.path.exists(path):
        raise ValueError(f"--{option} {path!r}: does not exist: give the path of {what}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "encoder.safetensors")):
            raise ValueError(f"--{option} {path!r}: is a folder: give the file of {what}")
        return
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"--{option} {path!r}: is not a regular file (a device or a pipe?): give the file of {what}")


# ---------------------------------------------------------------------- small JSON files
def read_small_json(path: str, what: str = "JSON file", cap: int = MAX_JSON_BYTES):
    """The parsed JSON of a small regular file; ValueError (one line) for a device, a FIFO, a file over
    `cap` bytes, non-UTF-8 bytes, invalid or too deeply nested JSON. Never reads more than `cap` + 1 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ValueError(f"{what} {path!r}: cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what} {path!r} is not a regular file")
        if st.st_size > cap:
            raise ValueError(f"{what} {path!r} is {st.st_size} bytes, over the {cap}-byte limit: is it the right "
                             "file?")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise ValueError(f"{what} {path!r} is over the {cap}-byte limit: is it the right file?")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path!r} is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{what} {path!r} is nested too deeply to be a configuration") from None
    except ValueError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON ({e})") from None


__all__ = ["checkpoint_keys", "safetensors_header", "safetensors_shapes", "check_input_file", "read_small_json"]
