"""dlbhc.images: robust decoding of odd image files, folder and list walking."""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from dlbhc.errors import UserError
from dlbhc.images import (BadImage, ImageItem, is_image_file, list_images,
                          read_image, resize_for_net)


def _save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _gradient_rgb(width=64, height=48):
    """A smooth RGB image, so lossy JPEG keeps it close to the original."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    arr = np.stack([np.broadcast_to(x, (height, width)),
                    np.broadcast_to(y, (height, width)),
                    np.full((height, width), 128, np.float32)], axis=2)
    return arr.astype(np.uint8)


# --- bad files ----------------------------------------------------------------

def test_random_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(BadImage) as info:
        read_image(path)
    assert info.value.path == path
    assert "not an image" in info.value.reason


def test_text_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a text file, not a photo\n" * 20)
    with pytest.raises(BadImage, match="not an image"):
        read_image(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadImage) as info:
        read_image(path)
    assert info.value.reason == "empty file (0 bytes)"
    assert isinstance(info.value, ValueError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadImage, match="file not found"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(BadImage, match="directory"):
        read_image(tmp_path / "dir.jpg")


def _truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_gradient_rgb(256, 256)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_jpeg(tmp_path):
    with pytest.raises(BadImage, match="truncated"):
        read_image(_truncated_jpeg(tmp_path))


def test_truncated_jpeg_detected_even_if_pillow_is_told_to_allow_it(tmp_path):
    path = _truncated_jpeg(tmp_path)
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(BadImage, match="truncated"):
            read_image(path)
        # The caller's setting is restored afterwards.
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:3000])
    with pytest.raises(BadImage) as info:
        read_image(path)
    assert "truncated" in info.value.reason or "corrupt" in info.value.reason


def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height, with one tiny IDAT."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_header_is_rejected_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(60000, 60000))
    with pytest.raises(BadImage, match="decompression-bomb"):
        read_image(path)


def test_max_pixels_limit(tmp_path):
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "small.png")
    with pytest.raises(BadImage, match="decompression-bomb.*20x20 = 400 pixels"):
        read_image(path, max_pixels=399)
    assert read_image(path, max_pixels=400).shape == (20, 20, 3)


# --- odd but valid files ------------------------------------------------------

def test_rgb_png_roundtrip_is_exact(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (7, 11, 3), np.uint8)
    out = read_image(_save(Image.fromarray(arr), tmp_path / "a.PNG"))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    out = read_image(_save(Image.fromarray(gray, "L"), tmp_path / "g.png"))
    assert out.shape == (5, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_one_bit_image(tmp_path):
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 1), 1)
    out = read_image(_save(img, tmp_path / "bw.png"))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_cmyk_jpeg(tmp_path):
    # Pure cyan-free magenta+yellow = red in CMYK.
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    path = _save(img, tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = read_image(path)
    assert out.shape == (32, 32, 3)
    r, g, b = out[16, 16].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 200              # red channel everywhere
    rgba[0, 0, 3] = 255             # opaque
    rgba[0, 1, 3] = 0               # fully transparent
    rgba[0, 2, 3] = 128             # half
    rgba[1, :, 3] = 255
    out = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    half = 128 / 255
    expected = [round(200 * half + 255 * (1 - half)), round(255 * (1 - half))]
    assert out[0, 2].tolist() == [expected[0], expected[1], expected[1]]


def test_gray_alpha_png(tmp_path):
    la = Image.new("LA", (3, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))
    out = read_image(_save(la, tmp_path / "la.png"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def _palette_image():
    img = Image.new("P", (4, 4), 0)
    palette = [0, 0, 0] * 256
    palette[3:6] = [10, 200, 30]    # index 1: green
    palette[6:9] = [250, 0, 0]      # index 2: red, declared transparent below
    img.putpalette(palette)
    img.putpixel((0, 0), 1)
    img.putpixel((1, 0), 2)
    return img


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency(tmp_path, ext):
    path = _save(_palette_image(), tmp_path / f"p.{ext}", transparency=2)
    assert Image.open(path).mode == "P"
    out = read_image(path)
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [10, 200, 30]
    assert out[0, 1].tolist() == [255, 255, 255]   # transparent index -> white
    assert out[3, 3].tolist() == [0, 0, 0]


def test_palette_without_transparency(tmp_path):
    out = read_image(_save(_palette_image(), tmp_path / "p.png"))
    assert out[0, 1].tolist() == [250, 0, 0]


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_gray_is_scaled_not_clipped(tmp_path, ext):
    values = np.array([[0, 257, 257 * 128, 65535, 32768, 1000]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / f"deep.{ext}")
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    assert out.shape == (1, 6, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 128, 4]
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_32bit_integer_image(tmp_path):
    # Values that fit 16 bits are read as 16-bit data ...
    fits = np.array([[0, 65535, 257 * 10]], np.int32)
    out = read_image(_save(Image.fromarray(fits, "I"), tmp_path / "i16.tif"))
    assert out[0, :, 0].tolist() == [0, 255, 10]
    # ... other ranges are stretched onto 0..255.
    wide = np.array([[-5, 100000, 49997]], np.int32)
    out = read_image(_save(Image.fromarray(wide, "I"), tmp_path / "i32.tif"))
    assert out[0, :, 0].tolist() == [0, 255, 127]   # 50002/100005*255


def test_float_image_in_unit_range_is_scaled(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], np.float32)
    out = read_image(_save(Image.fromarray(values, "F"), tmp_path / "f.tif"))
    assert out[0, :, 1].tolist() == [0, 128, 255]


def test_float_image_outside_unit_range_is_stretched(tmp_path):
    values = np.array([[-100.0, 0.0, 300.0]], np.float32)
    out = read_image(_save(Image.fromarray(values, "F"), tmp_path / "f.tif"))
    assert out[0, :, 0].tolist() == [0, 64, 255]


def test_exif_orientation_6_rotates(tmp_path):
    # 40 wide x 20 high, left half red, right half blue.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6    # "rotate 90 CW to display"
    path = _save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (40, 20, 3)
    # After a clockwise quarter turn the left (red) half is on top.
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50


def test_resize_for_net():
    img = _gradient_rgb(50, 30)
    out = resize_for_net(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert resize_for_net(img, (10, 20)).shape == (10, 20, 3)
    assert resize_for_net(img, (30, 50)) is img
    # A flat image stays flat through the filter.
    flat = np.full((100, 80, 3), 77, np.uint8)
    assert (resize_for_net(flat, 7) == 77).all()
    with pytest.raises(ValueError):
        resize_for_net(img, 0)


# --- folders and list files ---------------------------------------------------

def _make_tree(root):
    for rel in ["dogs/b.JPG", "dogs/a.png", "cats/z.jpeg", "cats/sub/deep.png",
                "birds/x.bmp", "loose.png", "cats/readme.txt", ".hidden/h.png",
                "dogs/.ds.png"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")   # list_images does not decode


def test_list_folder_labels_and_order(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "empty_class").mkdir()
    found = list_images(tmp_path)
    assert found.classes == ["birds", "cats", "dogs", "empty_class"]
    assert [(i.relpath, i.label) for i in found.items] == [
        ("birds/x.bmp", 0),
        ("cats/sub/deep.png", 1),
        ("cats/z.jpeg", 1),
        ("dogs/a.png", 2),
        ("dogs/b.JPG", 2),
        ("loose.png", -1),
    ]
    assert found.items[0].path == tmp_path / "birds" / "x.bmp"
    assert list_images(tmp_path) == found   # deterministic


def test_list_folder_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="no image files found"):
        list_images(tmp_path)


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_images(tmp_path / "nowhere")


def test_list_file_with_root_comments_and_spaces(tmp_path):
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\n\n"
                   "cats/1.jpg 3\n"
                   "  my photos/holiday 2.jpg   7  \n"
                   "unlabelled.png\n"
                   "/abs/path.png 0\n"
                   "dir with space/x.jpg\n")
    root = tmp_path / "images"
    root.mkdir()
    found = list_images(lst, root=root)
    assert found.classes is None
    assert found.items == [
        ImageItem(root / "cats/1.jpg", 3, "cats/1.jpg"),
        ImageItem(root / "my photos/holiday 2.jpg", 7, "my photos/holiday 2.jpg"),
        ImageItem(root / "unlabelled.png", -1, "unlabelled.png"),
        ImageItem(root / "/abs/path.png", 0, "/abs/path.png"),
        ImageItem(root / "dir with space/x.jpg", -1, "dir with space/x.jpg"),
    ]
    assert found.items[3].path == type(root)("/abs/path.png")


def test_list_file_with_class_name_labels(tmp_path):
    """`path class` lines are labelled as a folder's classes are (sorted
    names -> 0..C-1), so extract.py and training read one list alike; a
    last word that is part of an image path, or a line naming an existing
    file, stays a path."""
    (tmp_path / "holiday snaps").write_bytes(b"x")
    lst = tmp_path / "named.txt"
    lst.write_text("dogs/1.jpg dogs\ncats/1.jpg cats\nbirds/x 2.png   birds\n"
                   "loose photo.jpg\nholiday snaps\n")
    found = list_images(lst)
    assert found.classes == ["birds", "cats", "dogs"]
    assert found.items == [
        ImageItem(tmp_path / "dogs/1.jpg", 2, "dogs/1.jpg"),
        ImageItem(tmp_path / "cats/1.jpg", 1, "cats/1.jpg"),
        ImageItem(tmp_path / "birds/x 2.png", 0, "birds/x 2.png"),
        ImageItem(tmp_path / "loose photo.jpg", -1, "loose photo.jpg"),
        ImageItem(tmp_path / "holiday snaps", -1, "holiday snaps"),
    ]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a.jpg 0\nb.jpg cats\n")
    with pytest.raises(UserError, match=r"mixes number labels \(a.jpg 0\) and name labels "
                                        r"\(b.jpg cats\)"):
        list_images(mixed)


def test_list_file_defaults_to_its_own_folder(tmp_path):
    lst = tmp_path / "set.txt"
    lst.write_text("a/b.jpg 1\n")
    assert list_images(lst).items[0].path == tmp_path / "a" / "b.jpg"


@pytest.mark.parametrize("line, message", [
    ("img.jpg 1.5", "not an integer"),
    ("42", "no image path"),
    ("img.jpg -3", "out of range"),
    ("img.jpg 99999999999", "out of range"),
])
def test_list_file_bad_line_names_file_and_line(tmp_path, line, message):
    lst = tmp_path / "bad.txt"
    lst.write_text(f"ok.jpg 0\n# fine\n{line}\n")
    with pytest.raises(UserError) as info:
        list_images(lst)
    text = str(info.value)
    assert f"{lst}, line 3" in text and message in text


def test_list_file_errors(tmp_path):
    lst = tmp_path / "only_comments.txt"
    lst.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="lists no images"):
        list_images(lst)
    binary = tmp_path / "photo.txt"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\xff\xfe")
    with pytest.raises(UserError, match="not a UTF-8 text list file"):
        list_images(binary)
    with pytest.raises(UserError, match="root folder .* does not exist"):
        list_images(lst, root=tmp_path / "missing")
    with pytest.raises(UserError, match="list files only"):
        list_images(tmp_path, root=tmp_path)


def test_is_image_file():
    assert is_image_file("A.JPEG") and is_image_file("x.tif")
    assert not is_image_file("x.txt") and not is_image_file("jpg")
    assert os.path.splitext("x.tar.gz")[1] == ".gz" and not is_image_file("x.tar.gz")


def test_decode_image_reads_uploads_as_read_image_reads_files(tmp_path):
    import io
    from dlbhc.images import decode_image
    rng = np.random.default_rng(3)
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "L"), ("GIF", "P")):
        img = Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8), "RGBA")
        path = tmp_path / f"x.{fmt.lower()}"
        img.convert(mode).save(path, format=fmt)
        data = path.read_bytes()
        expected = read_image(path)
        assert np.array_equal(decode_image(data, "x"), expected)
        stream = io.BytesIO(data)
        stream.seek(7)
        assert np.array_equal(decode_image(stream, "x"), expected)
    with pytest.raises(BadImage, match="empty"):
        decode_image(b"", "e.png")
    with pytest.raises(BadImage, match="not an image"):
        decode_image(b"hello", "h.jpg")
    with pytest.raises(BadImage, match="decompression-bomb guard: 30x20"):
        decode_image((tmp_path / "x.png").read_bytes(), "x", max_pixels=399)
