"""Read PyTorch ``.pth`` files into NumPy without PyTorch and without running code from the file.

``torch.save`` writes a pickle whose tensors point to raw storages: in the zip format (torch >= 1.6) the
pickle is ``<archive>/data.pkl`` and storage ``k`` is ``<archive>/data/k``; in the legacy format one
stream holds a magic number, a header, the pickle, the list of storage keys and then each storage
(an int64 element count followed by the raw bytes).

A pickle is a small program: unpickling an arbitrary file can import and call anything (``os.system``
included). ``read_pth`` runs the program with a restricted unpickler:

* only these names resolve to real callables: ``collections.OrderedDict``, the tensor/parameter rebuild
  functions of ``torch._utils`` / ``torch._tensor`` (replaced by NumPy versions written here) and the
  storage and dtype names of ``torch`` (replaced by NumPy dtypes);
* every other name (a yacs ``CfgNode``, an ``argparse.Namespace``, numpy scalars, ``os.system``, ...)
  becomes an ``OpaqueObject`` class: calling or instantiating it only records the name and arguments,
  so training checkpoints that pickle their configuration load, and a crafted payload never runs.

Tensors come back as C-contiguous NumPy arrays (bfloat16 widened to float32). Malformed, truncated or
inconsistent files raise ``PthError`` with a one-line reason.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np


class PthError(ValueError):
    """The file is not a readable PyTorch checkpoint (garbage, truncated, inconsistent storages)."""


class OpaqueObject(dict):
    """Stand-in for a pickled object of a class we do not rebuild (never imported, never executed).

    Records what the pickle said about it: ``pickled_name`` ('module.Name'), the constructor arguments
    and any state; dict/list items pickled with it are kept (a yacs CfgNode stays readable as a dict).
    """

    pickled_name = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs, self.state, self.items_list = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items_list.append(item)

    def extend(self, items):
        self.items_list.extend(items)

    def __repr__(self):
        return f"<unpickled {self.pickled_name}>"


def _opaque_class(module, name):
    return type(name, (OpaqueObject,), {"pickled_name": f"{module}.{name}", "__module__": "models.pth_reader"})


# torch storage class -> dtype of its elements ("bfloat16" is widened after reading)
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "UntypedStorage": "u1",
}
_TORCH_DTYPES = {
    "float32": "<f4", "float": "<f4", "float64": "<f8", "double": "<f8", "float16": "<f2", "half": "<f2",
    "bfloat16": "bfloat16", "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4", "int16": "<i2",
    "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}


class _DType:
    """A torch storage or dtype name resolved to a NumPy dtype (``bfloat16`` read as uint16, then widened)."""

    def __init__(self, name, code):
        self.name, self.bfloat16 = name, code == "bfloat16"
        self.numpy = np.dtype("<u2" if self.bfloat16 else code)

    def __setstate__(self, state):
        raise PthError(f"the pickle tries to modify the type {self.name}")


class _Storage:
    """One storage: a flat NumPy array of its elements (None while only its size is known)."""

    def __init__(self, array, bfloat16, numel=None):
        self.array, self.bfloat16 = array, bfloat16
        self.numel = array.size if array is not None else numel

    def __setstate__(self, state):
        raise PthError("the pickle tries to modify a storage")


def _as_int_tuple(value, what):
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in value):
        raise PthError(f"tensor {what} is not a tuple of integers: {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """NumPy version of torch._utils._rebuild_tensor_v2: a strided view of ``storage``, copied."""
    if not isinstance(storage, _Storage):
        raise PthError(f"tensor data is not a storage ({type(storage).__name__})")
    size, stride = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if not isinstance(storage_offset, int) or storage_offset < 0 or len(size) != len(stride) \
            or any(v < 0 for v in size + stride):
        raise PthError(f"invalid tensor layout: offset {storage_offset!r}, size {size}, stride {stride}")
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise PthError(f"tensor of size {size} (offset {storage_offset}, stride {stride}) reads past the "
                           f"end of its storage of {storage.numel} elements")
    flat = storage.array
    if flat is None:  # first pass over a legacy file: layout checked, data not read yet
        return None
    if 0 in size:
        array = np.zeros(size, flat.dtype)
    else:
        item = flat.itemsize
        array = np.lib.stride_tricks.as_strided(flat[storage_offset:], size, [s * item for s in stride]).copy()
    if storage.bfloat16:  # bfloat16 is the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_):
    del requires_grad, backward_hooks, dtype  # the storage already carries its element type
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """Tensor subclasses: rebuild the plain tensor with ``func`` (one of ours), ignore the subclass."""
    del new_type, state
    if func not in _REBUILDERS.values():
        raise PthError("a tensor subclass is rebuilt by a function this reader does not allow")
    return func(*args)


_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the whitelisted names; everything else becomes an inert OpaqueObject class."""

    def __init__(self, stream, load_storage):
        super().__init__(stream)
        self._load_storage = load_storage
        self._opaque = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in _REBUILDERS:
            return _REBUILDERS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _DType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(name, _TORCH_DTYPES[name])
        key = (module, name)
        if key not in self._opaque:
            self._opaque[key] = _opaque_class(module, name)
        return self._opaque[key]

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise PthError(f"unknown persistent record {str(pid)[:60]}")
        dtype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(dtype, _DType):
            raise PthError(f"storage of unknown type {getattr(dtype, 'pickled_name', dtype)!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise PthError(f"malformed storage record {str(pid)[:60]}")
        return self._load_storage(key, dtype, numel)


def _load(stream, load_storage):
    try:
        return _RestrictedUnpickler(stream, load_storage).load()
    except PthError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, RecursionError, MemoryError, UnicodeDecodeError) as err:
        raise PthError(f"corrupt pickle data ({type(err).__name__}: {err})") from None


def _storage_from_bytes(raw, dtype, numel, what):
    needed = numel * dtype.numpy.itemsize
    if len(raw) < needed:
        raise PthError(f"storage {what} holds {len(raw)} bytes, {needed} expected (truncated file?)")
    return _Storage(np.frombuffer(raw, dtype.numpy, count=numel), dtype.bfloat16)


def _read_zip(path):
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise PthError(f"not a readable zip archive ({err})") from None
    with archive:
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise PthError(f"zip archive without a single data.pkl (found {len(pickles)}): not a torch.save file")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little", b""):
            raise PthError("big-endian checkpoints are not supported")
        loaded = {}

        def load_storage(key, dtype, numel):
            if key not in loaded:
                member = f"{prefix}data/{key}"
                try:
                    raw = archive.read(member)
                except KeyError:
                    raise PthError(f"storage {key} is missing from the archive") from None
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                    raise PthError(f"storage {key} cannot be read ({err})") from None
                loaded[key] = _storage_from_bytes(raw, dtype, numel, key)
            return loaded[key]

        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise PthError(f"data.pkl cannot be read ({err})") from None
        return _load(io.BytesIO(data), load_storage)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy(path):
    """The pre-1.6 single-stream format: magic, version, system info, pickle, keys, storages."""
    with open(path, "rb") as handle:
        blob = handle.read()
    stream = io.BytesIO(blob)
    header = _RestrictedUnpickler(stream, None)
    try:
        magic = header.load()
        if magic != _LEGACY_MAGIC:
            raise PthError("neither a zip archive nor a legacy torch.save stream")
        header.load()  # protocol version
        info = header.load()
    except PthError:
        raise
    except Exception as err:  # any unpickling failure of the first bytes means "not a checkpoint"
        raise PthError(f"neither a zip archive nor a legacy torch.save stream ({type(err).__name__})") from None
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise PthError("big-endian checkpoints are not supported")
    # the storages follow the pickle: a first pass (tensors not built) learns their types and sizes
    start = stream.tell()
    records = {}

    def record_storage(key, dtype, numel):
        records.setdefault(key, (dtype, numel))
        return _Storage(None, dtype.bfloat16, numel)

    _load(stream, record_storage)
    keys = _load(stream, None)
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise PthError("corrupt storage key list")
    storages = {}
    for key in keys:
        head = stream.read(8)
        if len(head) != 8:
            raise PthError(f"storage {key} is missing (truncated file?)")
        (count,) = struct.unpack("<q", head)
        if key not in records or count != records[key][1]:
            raise PthError(f"storage {key} does not match its record in the pickle")
        dtype = records[key][0]
        storages[key] = _storage_from_bytes(stream.read(count * dtype.numpy.itemsize), dtype, count, key)
    missing = sorted(set(records) - set(storages))
    if missing:
        raise PthError(f"storage {missing[0]} is missing from the file")
    stream.seek(start)
    return _load(stream, lambda key, dtype, numel: storages[key])


def read_pth(path):
    """The object a ``torch.save`` file holds, with tensors as NumPy arrays (see the module docstring).

    Raises:
        PthError: the file is missing, not a torch checkpoint, truncated or inconsistent.
    """
    if not os.path.isfile(path):
        raise PthError(f"file not found: {path}")
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as handle:
        if handle.read(4) == b"PK\x03\x04":
            raise PthError("a damaged zip archive without its index (truncated download?)")
    return _read_legacy(path)
