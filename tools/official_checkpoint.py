"""Write a checkpoint in the official PyTorch layout, without PyTorch: to try the conversion path end to end.

    python tools/official_checkpoint.py --model swin_tiny_acmix --num_classes 10 \
        --model_overrides "{img_size: 32, embed_dim: 16, depths: [2, 2], num_heads: [2, 4], window_size: 4}" \
        --out runs/official_demo/swin_acmix_tiny.pth

The released Swin-ACmix weights (~110 MB) cannot be fetched by the tests; this tool builds one of our
models (seeded initial weights), renames its parameters back to the official ones (the inverse of
``models/convert.py``: gamma/beta -> weight/bias, moving_mean/variance -> running_mean/var, ResNet-ACmix's
fused ``qkv`` split into ``conv1/conv2/conv3``; BatchNorm's ``num_batches_tracked`` and Swin's
``relative_position_index`` added) and writes them as the official training scripts do:
``{'model': state_dict, 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'}`` with the config
a pickled ``yacs.config.CfgNode``, in ``torch.save``'s zip format (``--legacy``: the pre-1.6 format).
``torch.load`` reads the result (the config entry needs yacs and ``weights_only=False``, as the official
files do). Families: Swin, ResNet and PVT (SAN's unequal q/k/v split is not inverted). Exit 2 on bad input.
"""
import argparse
import collections
import io
import os
import pickle
import struct
import sys
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OFFICIAL_LEAVES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                   "moving_variance": "running_var"}
STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                 np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
                 np.dtype("int32"): "IntStorage", np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ---- torch.save's file format ---------------------------------------------------------------------------
class _Global:
    """A name the pickle refers to (``module.name``) without importing it here."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable; never called here
        raise TypeError(f"{self.module}.{self.name} is only a reference")


class _Tensor:
    """A NumPy array pickled as torch pickles a tensor: ``_rebuild_tensor_v2(storage, 0, size, stride, ...)``."""

    def __init__(self, array, storage):
        self.array, self.storage = array, storage

    def __reduce__(self):
        stride = tuple(s // self.array.itemsize for s in self.array.strides)
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, self.array.shape, stride, False, collections.OrderedDict()))


class _StorageRef:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Reduced:
    """An object of an unimported class, pickled as ``module.name(*args)`` (e.g. yacs' CfgNode(dict))."""

    def __init__(self, module, name, args):
        self.function, self.args = _Global(module, name), args

    def __reduce__(self):
        return self.function, self.args


class _TorchPickler(pickle._Pickler):  # the Python pickler: its dispatch table can learn _Global
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, stream, legacy):
        super().__init__(stream, protocol=2)
        self.legacy = legacy

    def save_global_reference(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = save_global_reference

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRef):
            return None
        storage_type = _Global("torch", STORAGE_NAMES[obj.array.dtype])
        record = ("storage", storage_type, obj.key, "cpu", obj.array.size)
        return record + (None,) if self.legacy else record


def _tensors(obj, storages):
    """``obj`` with every NumPy array replaced by a _Tensor over a new storage (listed in ``storages``)."""
    if isinstance(obj, np.ndarray):
        array = obj if obj.flags.c_contiguous else obj.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        if array.dtype not in STORAGE_NAMES:
            raise ValueError(f"arrays of dtype {array.dtype} cannot be written")
        ref = _StorageRef(str(len(storages)), array)
        storages.append(ref)
        return _Tensor(array, ref)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((key, _tensors(value, storages)) for key, value in obj.items())
    if isinstance(obj, dict):
        return {key: _tensors(value, storages) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(value, storages) for value in obj)
    return obj


def write_pth(path, obj, legacy=False):
    """Write ``obj`` (dicts, lists, numbers, strings, NumPy arrays as tensors) as ``torch.save`` would.

    The zip format: ``<name>/data.pkl``, ``<name>/data/<key>`` raw little-endian storages, ``version`` and
    ``byteorder`` records, entries stored uncompressed. ``legacy``: magic, version, system info, pickle,
    storage keys, then each storage as an int64 element count followed by its bytes.
    """
    storages = []
    converted = _tensors(obj, storages)
    stream = io.BytesIO()
    _TorchPickler(stream, legacy).dump(converted)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = path + ".tmp"
    if legacy:
        with open(temp, "wb") as handle:
            for value in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                               "type_sizes": {"short": 2, "int": 4, "long": 4}}):
                pickle.dump(value, handle, protocol=2)
            handle.write(stream.getvalue())
            pickle.dump(sorted(ref.key for ref in storages), handle, protocol=2)
            for ref in sorted(storages, key=lambda item: item.key):
                handle.write(struct.pack("<q", ref.array.size))
                handle.write(ref.array.astype(ref.array.dtype.newbyteorder("<"), copy=False).tobytes())
    else:
        name = os.path.splitext(os.path.basename(path))[0] or "archive"
        with zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{name}/data.pkl", stream.getvalue())
            archive.writestr(f"{name}/byteorder", "little")
            for ref in storages:
                archive.writestr(f"{name}/data/{ref.key}",
                                 ref.array.astype(ref.array.dtype.newbyteorder("<"), copy=False).tobytes())
            archive.writestr(f"{name}/version", "3\n")
    os.replace(temp, path)
    return path


# ---- our parameters -> the official state_dict -----------------------------------------------------------
def _relative_position_index(window):
    """Swin's (w*w, w*w) index of the relative-position bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (relative[..., 0] * (2 * window - 1) + relative[..., 1]).astype(np.int64)


def official_state_dict(model):
    """{official key: array} of one of our models (the inverse of ``models.convert.convert_state_dict``)."""
    params = {name: param.asnumpy() for name, param in model.parameters_and_names()}
    state = collections.OrderedDict()
    for name, value in params.items():
        module, _, leaf = name.rpartition(".")
        if module.endswith("sam.qkv") or module == "sam.qkv":
            raise ValueError("SAN's fused q/k/v of unequal widths is not split back by this tool")
        if (module == "qkv" or module.endswith(".qkv")) and params[f"{module}.weight"].ndim == 4:
            for index, part in enumerate(np.split(value, 3, axis=0), start=1):  # ResNet-ACmix: q | k | v convs
                state[f"{module[:-len('qkv')]}conv{index}.{leaf}"] = part
            continue
        if leaf in OFFICIAL_LEAVES and (f"{module}.gamma" in params):
            state[f"{module}.{OFFICIAL_LEAVES[leaf]}"] = value
            if leaf == "moving_variance":
                state[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
            continue
        state[name] = value
        if leaf == "relative_position_bias_table":
            window = (int(round(np.sqrt(value.shape[0]))) + 1) // 2
            state[f"{module}.relative_position_index"] = _relative_position_index(window)
    return state


def official_training_checkpoint(state, model_name="", epoch=0, max_accuracy=0.0, with_config=True):
    """The dict the official training scripts save around the weights."""
    blob = {"model": state, "optimizer": {}, "lr_scheduler": {}, "max_accuracy": max_accuracy, "epoch": epoch}
    if with_config:
        blob["config"] = _Reduced("yacs.config", "CfgNode", ({"MODEL": {"NAME": model_name}},))
    return blob


def main(argv=None):
    from engine.config import yaml_mapping
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name (Swin, ResNet or PVT family)")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--model_overrides", type=yaml_mapping, default={}, help="constructor arguments")
    parser.add_argument("--out", required=True, help=".pth file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--legacy", action="store_true", help="the pre-1.6 (non-zip) torch.save format")
    args = parser.parse_args(argv)
    import mindspore as ms
    from engine.runtime import ModelBuildError, build_model
    if args.num_classes < 1:
        print(f"error: --num_classes must be >= 1, got {args.num_classes}", file=sys.stderr)
        return 2
    ms.set_seed(args.seed)
    try:
        model, _ = build_model(args.model, args.num_classes, args.model_overrides)
        state = official_state_dict(model)
        write_pth(args.out, official_training_checkpoint(state, args.model), legacy=args.legacy)
    except (ModelBuildError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(state)} official-layout tensors of {args.model} ({args.num_classes} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
