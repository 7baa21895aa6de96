"""Test helpers shared between test files: tiny nets, image folders, Caffe
Datum LMDBs and means, running the command-line scripts, bad and hostile
requests to the API, legacy torch files and Qt resource bundles.

Everything is written under the folder a test gives (its tmp_path), never
into the checkout.
"""
import io
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# Shared with the benchmarks, so kept in the testing package: the seeded
# synthetic codes, and serve.py run for real; test files take them from here
# or from there.
from dlbhc_testing.server import Server, http_request, multipart  # noqa: F401
from dlbhc_testing.synthetic import clustered_codes, codes_from_ints  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PROTOTXT = ROOT / "prototxt"
EXTRACT = ROOT / "python" / "extract.py"
TRAIN = ROOT / "python" / "train.py"
MEAN = "104,117,123"


# ---- nets and images ---------------------------------------------------------

def make_tiny_net(caffe, folder, bits=12, size=24, seed=0, fc7=32, convs=0):
    """A deploy net with the project's blob names and random weights.
    convs: extra 32-channel 3x3 convolutions at full input resolution before
    the rest, which make the forward slow with few weights (a job that lasts
    long enough to be interrupted)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[4, 3, size, size]))
    bottom = n.data
    for i in range(convs):
        conv = L.Convolution(bottom, num_output=32, kernel_size=3, pad=1)
        setattr(n, f"slow{i}", conv)
        setattr(n, f"slow{i}_relu", L.ReLU(conv, in_place=True))
        bottom = conv
    n.conv1 = L.Convolution(bottom, num_output=8, kernel_size=3, stride=2)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.fc7 = L.InnerProduct(n.conv1, num_output=fc7)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.fc8_latent = L.InnerProduct(n.fc7, num_output=bits)
    n.latent = L.Sigmoid(n.fc8_latent)
    n.fc9_classifier = L.InnerProduct(n.latent, num_output=3)
    deploy = folder / f"tiny{bits}_{fc7}{f'_c{convs}' if convs else ''}_deploy.prototxt"
    deploy.write_text(str(n.to_proto()))
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(seed)
    for params in net.params.values():
        params[0].data[...] = rng.normal(0, 0.05, size=params[0].data.shape)
        params[1].data[...] = rng.normal(0, 0.05, size=params[1].data.shape)
    weights = folder / f"tiny{bits}_{fc7}{f'_c{convs}' if convs else ''}_s{seed}.caffemodel"
    net.save(str(weights))
    return deploy, weights


def make_images(folder, n, classes=("cats", "dogs"), size=(40, 30), seed=0):
    """n random PNG images in class subfolders of `folder`; their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        cls = classes[i % len(classes)]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / cls / f"img{i:04d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def make_copied_images(folder, n, copies, edits, seed=0):
    """make_images' n 32x32 images in folder/a, folder/b, with the first
    `copies` copied byte for byte (copyN.png) and the next `edits` lightly
    edited, every pixel +4 (editN.png): near-duplicates to find."""
    paths = make_images(folder, n, classes=("a", "b"), size=(32, 32), seed=seed)
    for k, src in enumerate(paths[:copies]):
        (folder / "a" / f"copy{k}.png").write_bytes(src.read_bytes())
    for k, src in enumerate(paths[copies:copies + edits]):
        arr = np.asarray(Image.open(src)).astype(np.int16) + 4
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / "b" / f"edit{k}.png")
    return paths


def learnable_images(rng, n, classes=4, size=32):
    """Class k: a bright square in quadrant k on noise; easy but not trivial.
    (n, 3, size, size) uint8 images and their labels."""
    labels = np.arange(n) % classes
    images = rng.integers(0, 80, size=(n, 3, size, size)).astype(np.uint8)
    half = size // 2
    for img, k in zip(images, labels):
        y, x = divmod(int(k), 2)
        img[:, y * half:(y + 1) * half, x * half:(x + 1) * half] += 150
    return images, labels


# ---- Caffe training data -----------------------------------------------------

def write_lmdb(caffe, path, images, labels):
    """A Caffe Datum LMDB of (C, H, W) uint8 images, as the Data layer reads."""
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i, (img, label) in enumerate(zip(images, labels)):
            datum = caffe.io.array_to_datum(img, int(label))  # img: C,H,W uint8
            txn.put(b"%08d" % i, datum.SerializeToString())
    env.close()


def write_mean(caffe, path, shape):
    """A constant (100) mean image of `shape` (C, H, W) as a .binaryproto."""
    blob = caffe.io.array_to_blobproto(np.full((1,) + shape, 100.0, dtype=np.float32))
    path.write_bytes(blob.SerializeToString())


def write_training_data(caffe, folder, train, test, mean_shape,
                        names=("train_lmdb", "test_lmdb", "mean.binaryproto")):
    """Train and test LMDBs from (images, labels) pairs and a mean file in
    `folder`, under `names`; returns their three paths."""
    paths = [folder / name for name in names]
    write_lmdb(caffe, paths[0], *train)
    write_lmdb(caffe, paths[1], *test)
    write_mean(caffe, paths[2], mean_shape)
    return paths


def derive_train_val(src, dst, train_lmdb, test_lmdb, mean, batch):
    """A checked-in train_val prototxt reading the given data, in batches of
    `batch`; `mean` replaces its mean file (a net with per-channel
    mean_values keeps them)."""
    from dlbhc.nets.protos import read_prototxt
    from dlbhc.training.prototxt import Phases, data_layers, set_data_layers, write_net
    net = read_prototxt(src, "NetParameter")
    reads_mean_file = any(layer.transform_param.mean_file for layer in data_layers(net))
    set_data_layers(net, source=Phases(train_lmdb, test_lmdb), batch_size=batch,
                    mean_file=mean if reads_mean_file else None)
    write_net(net, dst, f"{src.name} reading test data")


# ---- the scripts -------------------------------------------------------------

def run_script(script, args, check=True, timeout=300, **kw):
    """Run a python/ script with this Python; the CompletedProcess (text).
    check: assert it exited 0, showing the end of its stderr if not."""
    out = subprocess.run([sys.executable, str(script), *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def free_port():
    """A TCP port on the loopback address that nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_extract(args, check=True, **kw):
    """python/extract.py with `args` (see run_script)."""
    return run_script(EXTRACT, args, check=check, **kw)


def tiny_database(caffe, folder, n=40, classes=("a", "b", "c"), bits=12):
    """A feature database of n generated images (folder/imgs) made by
    extract.py with a tiny random net: {db, deploy, weights, folder}."""
    deploy, weights = make_tiny_net(caffe, folder, bits=bits)
    make_images(folder / "imgs", n, classes=classes)
    db = folder / "db.lmdb"
    run_extract([folder / "imgs", "--out", db, "--deploy", deploy, "--weights", weights,
                 "--mean", MEAN, "--batch-size", 8])
    return {"db": db, "deploy": deploy, "weights": weights, "folder": folder}


# ---- codes and tiny evaluation data -------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# A tiny 8-bit database, labels 0/1, and three queries.
#   id   code       label   d(q0)  d(q1)  d(q2)
#   0    00000011   0       2      6      5
#   1    00000001   1       1      7      4
#   2    00000000   1       0      8      5
#   3    00000010   0       1      7      6
#   4    11110000   0       4      4      1
#   5    00000110   1       2      6      7
# q0 = 00000000 label 0, q1 = 11111111 label 2 (nothing relevant),
# q2 = 11110001 label 0.
DB_CODES = codes_from_ints([0b00000011, 0b00000001, 0b00000000, 0b00000010,
                            0b11110000, 0b00000110], 8)
DB_LABELS = np.array([0, 1, 1, 0, 0, 1])
Q_CODES = codes_from_ints([0b00000000, 0b11111111, 0b11110001], 8)
Q_LABELS = np.array([0, 2, 0])


# ---- bad and hostile requests to the API -----------------------------------------

# Bad requests to the API of a 40-image database (ids 0..39, at most 32 a
# request): (path, status, words in the error). test_serve sends them over
# HTTP, test_api in process.
BAD_PARAMETERS = [
    ("/api/search?id=1&top_k=0", 400, "top_k"),
    ("/api/search?id=1&top_k=1000000000", 400, "top_k must be between 1 and 10000"),
    ("/api/search?id=1&top_k=abc", 400, "top_k"),
    ("/api/search?id=1&max_radius=-1", 400, "max_radius"),
    ("/api/search?id=1&candidates=0", 400, "candidates"),
    ("/api/search?top_k=3", 400, "id"),
    ("/api/search?" + "&".join(f"id={i}" for i in range(33)), 400, "at most 32"),
    ("/api/search?id=40", 404, "ids 0..39"),
    ("/api/search?id=-1", 404, "no image"),
    ("/api/search?id=abc", 404, "no image"),
    ("/api/search?id=1e3", 404, "no image"),
    ("/api/search?id=/etc/passwd", 404, "no image"),
    ("/api/search?id=../../etc/passwd", 404, "no image"),
    ("/api/images/99/thumbnail", 404, "no image"),
    ("/api/images/%2Fetc%2Fpasswd/thumbnail", 404, ""),
    ("/api/images/..%2F..%2Fetc%2Fpasswd/thumbnail", 404, ""),
    ("/api/images/../../../etc/passwd", 404, ""),
    ("/api/images/3/thumbnail?size=0", 400, "size"),
    ("/api/images/3/thumbnail?size=100000", 400, "size"),
    ("/static/..%2F..%2Fetc%2Fpasswd", 404, ""),
    ("/static/%2Fetc%2Fpasswd", 404, ""),
    ("/static/webapp.py", 404, ""),
    ("/etc/passwd", 404, ""),
]


def bomb_png(width=30000, height=30000):
    """A valid PNG header declaring width x height, with a few KB of data:
    decoding it would allocate width * height * 3 bytes (2.7 GB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + \
        chunk(b"IEND", b"")


def truncated_jpeg():
    """The first 700 bytes of a 64x64 JPEG of noise."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)) \
        .save(out, format="JPEG")
    return out.getvalue()[:700]


# ---- legacy PyTorch checkpoints ------------------------------------------------

def write_legacy_torch(path, tensors, extra_globals=(), fortran=False):
    """A legacy (pre-zip) torch.save file of an OrderedDict of numpy arrays,
    written without torch: the five pickles and raw storages torch < 1.6
    wrote. Each array gets its own float32/int64 storage, laid out in
    Fortran order with matching strides when `fortran` (as tensors converted
    from TensorFlow often are); `extra_globals` (module, name) pairs are
    pickled as extra values, to test refusals."""
    import io
    import pickle
    import struct

    class Global(NamedTuple):            # a reference to module.name
        module: str
        name: str

    class Tensor(NamedTuple):            # a storage reference (persistent id)
        key: str
        array: np.ndarray

    class Call(NamedTuple):              # function(*args) when unpickled
        function: object
        args: tuple

    storage_kind = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}

    # Protocol-2 pickles are written opcode by opcode here: a GLOBAL opcode
    # is the only way to name torch's functions without torch installed.
    def opcodes(obj):
        out = io.BytesIO()
        out.write(b"\x80\x02")

        def put(o):
            if isinstance(o, Global):
                out.write(b"c" + o.module.encode() + b"\n" + o.name.encode() + b"\n")
            elif isinstance(o, Call):
                put(o.function)
                put(tuple(o.args))
                out.write(b"R")
            elif isinstance(o, Tensor):
                put(("storage", Global("torch", storage_kind[o.array.dtype]), o.key, "cpu",
                     o.array.size, None))
                out.write(b"Q")           # BINPERSID: the tuple above is the id
            elif isinstance(o, tuple):
                out.write(b"(")
                for v in o:
                    put(v)
                out.write(b"t")
            elif isinstance(o, dict):
                put(Call(Global("collections", "OrderedDict"), ()))
                for k, v in o.items():
                    put(k)
                    put(v)
                    out.write(b"s")
            else:
                out.write(pickle.dumps(o, protocol=2)[2:-1])   # a plain value's opcodes
        put(obj)
        out.write(b".")
        return out.getvalue()

    entries = {}
    storages = []
    for i, (name, array) in enumerate(tensors.items()):
        array = np.asfortranarray(array) if fortran else np.ascontiguousarray(array)
        key = str(1000 + i)
        tensor = Tensor(key, array.ravel(order="K"))
        storages.append(tensor)
        stride = tuple(s // array.itemsize for s in array.strides)
        entries[name] = Call(Global("torch._utils", "_rebuild_tensor_v2"),
                             (tensor, 0, tuple(array.shape), stride, False,
                              Call(Global("collections", "OrderedDict"), ())))
    for j, (module, fname) in enumerate(extra_globals):
        entries[f"extra{j}"] = Call(Global(module, fname), ("echo hi",))
    with open(path, "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
        f.write(opcodes(entries))
        f.write(pickle.dumps([t.key for t in storages], protocol=2))
        for t in storages:
            f.write(struct.pack("<q", t.array.size))
            f.write(t.array.astype(t.array.dtype.newbyteorder("<")).tobytes())
    return path


# ---- Qt resource bundles (.rcc) -------------------------------------------------------

def write_rcc(path, files, version=2, compress=()):
    """A Qt binary resource file (.rcc) holding `files` {"dir/name": bytes},
    written independently of dlbhc.datasets.photos.read_rcc; members named in
    `compress` are stored zlib-compressed (qCompress: uint32 size + zlib)."""
    import struct
    import zlib
    tree = {}                                   # nested dicts: folders; bytes: files
    for name, data in files.items():
        node = tree
        *folders, leaf = name.split("/")
        for folder in folders:
            node = node.setdefault(folder, {})
        node[leaf] = data
    names, name_offsets = bytearray(), {}
    data_blob = bytearray()

    def name_offset(text):
        if text not in name_offsets:
            name_offsets[text] = len(names)
            encoded = text.encode("utf-16-be")
            names.extend(struct.pack(">HI", len(text), 0) + encoded)
        return name_offsets[text]

    # Breadth-first numbering: a folder's children are consecutive nodes.
    nodes = [("", tree, "")]                    # (name, content, full path)
    records = []
    i = 0
    while i < len(nodes):
        name, content, full = nodes[i]
        if isinstance(content, dict):
            first = len(nodes)
            for child in sorted(content):
                nodes.append((child, content[child], f"{full}/{child}".lstrip("/")))
            records.append(struct.pack(">IHII", name_offset(name), 2, len(content), first))
        else:
            payload = content
            flags = 0
            if full in compress:
                payload = struct.pack(">I", len(content)) + zlib.compress(content)
                flags = 1
            offset = len(data_blob)
            data_blob.extend(struct.pack(">I", len(payload)) + payload)
            records.append(struct.pack(">IHHHI", name_offset(name), flags, 0, 0, offset))
        if version >= 2:
            records[-1] += b"\0" * 8
        i += 1
    header = 4 + 16 + (4 if version >= 3 else 0)
    tree_blob = b"".join(records)
    tree_at, data_at = header, header + len(tree_blob)
    names_at = data_at + len(data_blob)
    head = b"qres" + struct.pack(">IIII", version, tree_at, data_at, names_at)
    if version >= 3:
        head += struct.pack(">I", 0)
    Path(path).write_bytes(head + tree_blob + bytes(data_blob) + bytes(names))
    return path
