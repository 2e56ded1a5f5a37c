"""Reliability: no silent data loss, no traceback for a user's mistake, no damaged file trusted.

Each test reproduces a failure a realistic user hit, on real files and real processes.

    .venv/bin/pytest tests/test_reliability.py -q
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_png_tree
from PIL import Image

from nnforge.config import ImageTrainConfig, TextTrainConfig
from nnforge.data.cache import TensorCache
from nnforge.data.imageio import decode_image
from nnforge.data.images import ImageData
from nnforge.data.rules import DataError
from nnforge.data.text import TextData
from nnforge.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nnforge.engine.run import Run, RunLocked

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "nnforge.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, **kw)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def quiet(*_):
    pass


# ----------------------------------------------------------------------------------------------------------------
# silent data loss


def _tsv(path: Path, n: int = 300) -> list[str]:
    lines = ["text\tlabel"] + [f"review number {i} was {'good' if i % 2 else 'bad'}\t{'pos' if i % 2 else 'neg'}"
                               for i in range(n)]
    return lines


@pytest.mark.parametrize("where", ["text", "label"])
def test_an_unterminated_quote_is_refused_with_its_line(tmp_path, where):
    lines = _tsv(tmp_path)
    text, label = lines[101].split("\t")
    lines[101] = f'"{text}\t{label}' if where == "text" else f'{text}\t"{label}'  # line 102 of the file
    path = tmp_path / "d.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:102: a quote opened in this record is never closed, so the next "
                                        rf"\d+ lines"):
        TextData.load(TextTrainConfig(data=str(path)), log=quiet)
    # a quoted text that really spans lines is still one text
    lines = _tsv(tmp_path)
    lines[5] = '"a review\nwith two\nline breaks"\tpos'
    path.write_text("\n".join(lines) + "\n")
    data = TextData.load(TextTrainConfig(data=str(path), vocab_size=200), log=quiet)
    assert data.report["usable"] == 300 and "a review\nwith two\nline breaks" in [r.text for r in data.rows]


def test_labels_written_as_numbers_are_one_class(tmp_path):
    rows = ["text,label"] + [f"text {i},{lab}" for i, lab in enumerate(["1", '"1"', '" 1 "', "1.0", "2", "2.00"] * 5)]
    path = tmp_path / "d.csv"
    path.write_text("\n".join(rows) + "\n")
    logs: list[str] = []
    data = TextData.load(TextTrainConfig(data=str(path), vocab_size=100, val_split=0, test_split=0), log=logs.append)
    assert data.classes == ["1", "2"]
    assert data.report["labels_normalised"] == {"'1.0' -> '1'": 5, "'2.00' -> '2'": 5}
    assert any("'1.0' -> '1' (5 rows)" in m for m in logs)


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    v8 = rng.integers(0, 256, (20, 20)).astype(np.uint8)
    Image.fromarray(v8).save(tmp_path / "8.png")
    Image.fromarray(v8.astype(np.uint16) * 257).save(tmp_path / "16.png")  # the same picture in 16 bits
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    a8 = decode_image((tmp_path / "8.png").read_bytes(), 1, 20)
    a16 = decode_image((tmp_path / "16.png").read_bytes(), 1, 20)
    np.testing.assert_array_equal(a8, a16)


def test_two_trainings_into_one_folder_cannot_both_write(png_tree, tmp_path):
    holder = Run(tmp_path / "image" / "same")
    holder.path.mkdir(parents=True)
    holder.lock()  # another process is training into runs/image/same
    p = cli("train", "image", "--data", png_tree, "--epochs", "1", "--batch-size", "8", "--out", tmp_path,
            "--name", "same", "--workers", "1", check=False)
    assert p.returncode == 2 and "is being written by process" in p.stderr and "Traceback" not in p.stderr
    assert not (holder.path / "checkpoints").exists()
    holder.unlock()
    # a holder that died (SIGKILL, no clean-up) leaves no stuck lock: the kernel drops it with the process
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from nnforge.engine.run import Run
        Run({str(holder.path)!r}).lock()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(RunLocked):
        Run(holder.path).lock()
    child.kill()
    child.wait(10)
    cli("train", "image", "--data", png_tree, "--epochs", "1", "--batch-size", "8", "--out", tmp_path,
        "--name", "same", "--workers", "1")
    assert (holder.path / "checkpoints" / "best.safetensors").is_file()


def test_a_failed_train_leaves_no_empty_run_folder(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    p = cli("train", "image", "--data", tmp_path / "empty", "--out", tmp_path / "runs", check=False)
    assert p.returncode == 2 and "is empty" in p.stderr
    assert list((tmp_path / "runs" / "image").iterdir()) == []


def test_predict_output_never_overwrites_an_input_or_an_existing_file(trained_run, png_tree, tmp_path):
    img = tmp_path / "shoe.png"
    img.write_bytes((png_tree / "circle" / "000.png").read_bytes())
    before = img.read_bytes()
    p = cli("predict", trained_run, img, "--output", img, check=False)
    assert p.returncode == 2 and "is one of the inputs" in p.stderr and img.read_bytes() == before
    p = cli("predict", trained_run, img, "--output", img, "--force", check=False)
    assert p.returncode == 2 and img.read_bytes() == before
    out = tmp_path / "preds.csv"
    out.write_text("keep me")
    p = cli("predict", trained_run, img, "--output", out, check=False)
    assert p.returncode == 2 and "--force" in p.stderr and out.read_text() == "keep me"
    cli("predict", trained_run, img, "--output", out, "--force")
    assert out.read_text().startswith("input,label_1,prob_1")
    p = cli("predict", trained_run, img, "--output", tmp_path, check=False)
    assert p.returncode == 2 and "is a folder" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------------------------------------------
# damaged or crafted files


def test_a_flipped_byte_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, {"model.w": torch.arange(1000, dtype=torch.float32)}, {"model": "x"})
    assert load_checkpoint(path)[0]["model.w"][500] == 500.0
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x40  # inside the tensor data, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(path)


def test_a_protocol_0_pickle_is_named_a_pickle(tmp_path):
    path = tmp_path / "old.safetensors"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=0))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


def test_a_crafted_run_is_refused_before_anything_is_allocated(trained_run, tmp_path):
    import shutil

    run = tmp_path / "crafted"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "best.safetensors"
    tensors, meta = load_checkpoint(ckpt)
    meta["io"]["input"]["size"] = 1_000_000
    save_checkpoint(ckpt, tensors, meta)
    p = cli("predict", run, trained_run / "split.json", check=False)
    assert p.returncode == 2 and "size=1000000" in p.stderr and "Traceback" not in p.stderr


def test_a_full_disk_while_checkpointing_is_one_clear_line_and_stale_temp_files_go(png_tree, tmp_path):
    # A file-size limit makes the checkpoint write fail as a full disk would (EFBIG instead of ENOSPC).
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, resource.RLIM_INFINITY))
        from nnforge.cli import main
        sys.exit(main(["train", "image", "--data", {str(png_tree)!r}, "--epochs", "1", "--batch-size", "8",
                       "--workers", "1", "--out", {str(tmp_path)!r}, "--name", "full",
                       "--model-args", "width=32"]))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "could not write" in p.stderr and "last.safetensors" in p.stderr and "Traceback" not in p.stderr
    # a temporary file a killed writer left behind is removed the next time a process takes the run
    run = tmp_path / "image" / "kept"
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / ".last.safetensors.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    Run(run).lock()
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------------------------
# a user's mistake: one clear line


def test_symlinks_loops_dangling_and_outside_are_handled(tmp_path):
    root = make_png_tree(tmp_path / "data", per_class=4, bad_files=False)
    (root / "circle" / "loop").symlink_to(root)  # a folder link back up the tree
    (root / "cross" / "self.png").symlink_to(root / "cross" / "self.png")  # a link to itself (ELOOP)
    (root / "cross" / "gone.png").symlink_to(tmp_path / "missing.png")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((root / "stripes" / "000.png").read_bytes())
    (root / "stripes" / "out.png").symlink_to(outside)
    logs: list[str] = []
    data = ImageData.load(ImageTrainConfig(data=str(root), workers=1), TensorCache(tmp_path / "c"), log=logs.append)
    reasons = {Path(s["path"]).name: s["reason"] for s in data.report["skipped"]}
    assert "loop" in reasons["self.png"] and "broken symbolic link" in reasons["gone.png"]
    assert "loop" in reasons["loop"]
    assert [o["target"] for o in data.report["outside_links"]] == [str(outside)]
    assert data.report["usable"] == 13  # 12 pictures + the outside one; the folder link was not followed
    assert data.report["counts"]["train"]["circle"] + data.report["counts"]["val"].get("circle", 0) + \
        data.report["counts"]["test"].get("circle", 0) == 4
    assert any("lead out of the data folder" in m for m in logs)


def test_text_files_nobody_labelled_right(tmp_path):
    # UTF-16 without a byte-order mark
    rows = ["text,label"] + [f"text number {i},{'a' if i % 2 else 'b'}" for i in range(20)]
    (tmp_path / "u16.csv").write_bytes("\n".join(rows).encode("utf-16-le"))
    data = TextData.load(TextTrainConfig(data=str(tmp_path / "u16.csv"), vocab_size=100), log=quiet)
    assert data.report["usable"] == 20 and data.report["encoding"][str(tmp_path / "u16.csv")] == "utf-16-le"
    # a column name used twice
    (tmp_path / "dup.csv").write_text("text,label,text\nx,a,y\n")
    with pytest.raises(DataError, match="column 'text' appears 2 times"):
        TextData.load(TextTrainConfig(data=str(tmp_path / "dup.csv")), log=quiet)
    # NUL bytes inside a text
    (tmp_path / "nul.csv").write_text("\n".join(rows[:10] + ["bin\x00ary,a"] + rows[10:]) + "\n")
    data = TextData.load(TextTrainConfig(data=str(tmp_path / "nul.csv"), vocab_size=100), log=quiet)
    assert [s["reason"] for s in data.report["skipped"]] == ["NUL byte in the text (binary data, or UTF-16 "
                                                              "read as 8-bit?)"]


def test_an_image_csv_in_latin_1_is_read(tmp_path):
    root = make_png_tree(tmp_path / "imgs", per_class=3, bad_files=False)
    cafe = "caf\u00e9"
    lines = ["path,label"] + [f"{p.relative_to(tmp_path)},{cafe if p.parent.name == 'circle' else 'autre'}"
                              for p in sorted(root.rglob("*.png"))]
    (tmp_path / "list.csv").write_bytes("\n".join(lines).encode("latin-1"))
    data = ImageData.load(ImageTrainConfig(data=str(tmp_path / "list.csv"), workers=1, val_split=0, test_split=0),
                          TensorCache(tmp_path / "c"), log=quiet)
    assert data.classes == ["autre", "caf\u00e9"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height 8-bit gray pixels (its data is a few bytes): what a bomb looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_huge_image_names_nnforges_limit():
    from nnforge.data.imageio import ImageError

    for side, pixels in ((30000, 900000000), (6000, 36000000)):  # above Pillow's own limit, and below it
        with pytest.raises(ImageError, match=rf"{pixels} pixels is over the limit of 25000000 pixels.*--max-pixels"):
            decode_image(_png_header_only(side, side), 1, 28, max_pixels=25_000_000)
