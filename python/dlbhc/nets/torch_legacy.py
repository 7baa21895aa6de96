"""Reading a legacy (pre-zip, torch < 1.6) PyTorch checkpoint without torch.

Registry packages ship ImageNet weights as `torch.save` files; importing
torch (hundreds of MB) only to read a few tensors is not worth it, and
unpickling a downloaded file with the full pickle machinery would run any
code it names. The legacy format is five consecutive pickles and raw bytes:

    magic number, protocol version, sys info,
    the object (a state dict) whose tensors point at storages by key
        (pickle persistent ids ('storage', <type>, key, location, size, view)),
    the list of storage keys in file order,
    then per key: an int64 element count and the storage's raw bytes.

Only the globals a state dict of plain tensors needs are allowed
(collections.OrderedDict, torch._utils._rebuild_tensor(_v2), the typed
storages); anything else is refused with a UserError. Tensors come back as
numpy arrays (copies, C-contiguous, little-endian as stored).
"""
import collections
import pickle
import struct
from pathlib import Path

import numpy as np

from ..errors import UserError

# torch.save's magic number for the legacy format, and the protocol version
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# storage class name -> numpy dtype (the element types a state dict holds)
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands for torch.<X>Storage inside the pickle."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """A storage named by a persistent id; its bytes are read after the pickle."""

    def __init__(self, storage_type, key, size):
        self.dtype = storage_type.dtype
        self.key = key
        self.size = size
        self.array = None


class _TensorRef:
    """A tensor waiting for its storage's bytes (they follow the pickle)."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(shape), tuple(stride)

    def materialize(self):
        base = self.storage.array
        if not self.shape:
            return base[self.offset:self.offset + 1].reshape(()).copy()
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride), writeable=False)
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride,
    [requires_grad, backward_hooks])."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage reference")
    return _TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals of a plain state dict."""

    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only plain "
                                     "tensors in (ordered) dicts are read")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, size = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, key, int(size))
        return self.storages[key]


def _resolve(obj):
    """Replace every _TensorRef inside dicts/lists/tuples by its array."""
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def load_state_dict(path):
    """{name: numpy array} of a legacy torch.save file holding a state dict
    (or a dict holding one under 'state_dict'). UserError when the file is
    not that format, is damaged, or asks for anything but tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _load(f, path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, KeyError,
            AttributeError, TypeError, IndexError) as err:
        raise UserError(f"{path} is not a readable legacy PyTorch checkpoint: {err}") from None


def _load(f, path):
    head = f.read(2)
    f.seek(0)
    if head[:2] == b"PK":
        raise UserError(f"{path} is a zip-format torch checkpoint (torch >= 1.6); only the "
                        "legacy format is read here")
    plain = pickle.Unpickler  # the three header pickles are numbers and a dict
    if plain(f).load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("wrong magic number")
    if plain(f).load() != LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unsupported protocol version")
    sys_info = _RestrictedUnpickler(f, {}).load()
    if not sys_info.get("little_endian", True):
        raise UserError(f"{path} was written on a big-endian machine; not supported")
    storages = {}
    obj = _RestrictedUnpickler(f, storages).load()
    keys = _RestrictedUnpickler(f, {}).load()
    for key in keys:
        storage = storages[key]
        (count,) = struct.unpack("<q", f.read(8))
        nbytes = count * storage.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise EOFError(f"storage {key}: {len(data)} of {nbytes} bytes (file cut short)")
        storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<"))
    missing = [k for k, s in storages.items() if s.array is None]
    if missing:
        raise pickle.UnpicklingError(f"storages {missing[:3]} have no data in the file")
    obj = _resolve(obj)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return dict(obj)
