"""User-provided data folders: every odd file is used correctly or skipped with a listed warning, never a crash."""

import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dogclf.config import DataConfig
from dogclf.data import DataError, WhiteDogsDataModule
from dogclf.data.cache import decode_image

SIZE = 32


def data_config(root: Path) -> DataConfig:
    return DataConfig(root=str(root), image_size=SIZE, val_fraction=0.15, test_fraction=0.15, max_per_class=None,
                      batch_size=4, sampler="shuffle", num_workers=0, cache_dir=None, crop_scale_min=0.35,
                      color_jitter=0.2)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def gradient(width: int = 60, height: int = 40) -> Image.Image:
    """A picture whose orientation is visible: red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1))


def copy_photos(white_dogs: Path, root: Path, classes: tuple[str, ...], count: int) -> Path:
    """The first `count` real photos (by name) of each class, copied into root/<class>/."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for path in sorted((white_dogs / name).glob("*.jpg"))[:count]:
            shutil.copy(path, root / name / path.name)
    return root


@pytest.fixture
def hostile_root(tmp_path: Path, white_dogs: Path) -> Path:
    """Two classes of real photos plus one of every kind of odd file."""
    root = copy_photos(white_dogs, tmp_path / "dogs", ("maltese", "samoyed"), 6)
    odd = root / "samoyed"
    real = sorted((white_dogs / "samoyed").glob("*.jpg"))[10].read_bytes()
    (odd / "truncated.jpg").write_bytes(real[: len(real) // 3])
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "text.jpg").write_text("not an image\n")
    save(Image.new("RGBA", (50, 40), (255, 255, 255, 0)), odd / "alpha.png")
    save(gradient().convert("L"), odd / "gray.jpg")
    save(gradient().convert("CMYK"), odd / "cmyk.jpg")
    save(Image.fromarray(np.linspace(0, 65535, 2400).reshape(40, 60).astype(np.uint16)), odd / "deep.png")
    frames = [Image.new("RGB", (40, 40), c) for c in ("white", "black")]
    frames[0].save(odd / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    (odd / ".hidden.jpg").write_bytes(real)
    os.symlink(odd / "loop.jpg", odd / "loop.jpg")  # a symlink pointing at itself
    (odd / os.fsdecode(b"caf\xe9.jpg")).write_bytes(real)  # a Latin-1 (non-UTF-8) file name
    return root


def test_odd_files_are_used_or_skipped_with_one_warning(hostile_root: Path, tmp_path: Path) -> None:
    dm = WhiteDogsDataModule(data_config(hostile_root), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    messages = [str(w.message) for w in caught if "unreadable image" in str(w.message)]
    assert len(messages) == 1, messages  # one warning listing all of them
    for name in ("truncated.jpg", "empty.jpg", "text.jpg"):
        assert name in messages[0]
    used = {s.path.name for part in dm.splits.values() for s in part}
    for name in ("alpha.png", "gray.jpg", "cmyk.jpg", "deep.png", "animated.gif", os.fsdecode(b"caf\xe9.jpg")):
        assert name in used, name
    assert ".hidden.jpg" not in used and "loop.jpg" not in used
    for images, _ in dm.train_dataloader():  # every decoded image goes through the transforms
        assert images.shape[1:] == (3, SIZE, SIZE) and torch.isfinite(images).all()
    dm.write_split_csv(tmp_path / "split.csv")  # the non-UTF-8 name survives the split file
    assert "caf" in (tmp_path / "split.csv").read_text(errors="surrogateescape")


def test_decoded_modes_become_rgb(hostile_root: Path) -> None:
    folder = hostile_root / "samoyed"
    for name in ("alpha.png", "gray.jpg", "cmyk.jpg", "deep.png", "animated.gif"):
        image = decode_image(folder / name, 24)
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) == 24, name
    deep = decode_image(folder / "deep.png", 40).float()  # a 0..65535 ramp
    assert (deep == 255).float().mean() < 0.05 and 100 < deep.mean() < 155  # scaled to 8 bits, not clipped


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    upright = gradient()  # 60 x 40, red increases to the right
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    upright.rotate(90, expand=True).save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buffer.getvalue())
    image = decode_image(path, 40)
    assert image.shape[1:] == (40, 60)  # landscape again
    red = image[0].float()
    assert red[:, -5:].mean() > red[:, :5].mean() + 100


def test_decompression_bomb_is_skipped(tmp_path: Path, white_dogs: Path) -> None:
    root = copy_photos(white_dogs, tmp_path / "dogs", ("maltese", "samoyed"), 4)
    # A 30000 x 30000 PNG of one colour compresses to a few hundred kilobytes.
    save(Image.new("1", (30000, 30000)), root / "samoyed" / "bomb.png", optimize=True)
    dm = WhiteDogsDataModule(data_config(root), seed=0)
    with pytest.warns(UserWarning, match=r"bomb\.png: DecompressionBombError"):
        dm.setup()
    assert "bomb.png" not in {s.path.name for part in dm.splits.values() for s in part}


def test_class_left_without_usable_images_fails_before_training(tmp_path: Path, white_dogs: Path) -> None:
    root = copy_photos(white_dogs, tmp_path / "dogs", ("maltese",), 4)
    (root / "spitz").mkdir()
    (root / "spitz" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"spitz has no usable images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        WhiteDogsDataModule(data_config(root), seed=0).setup()
