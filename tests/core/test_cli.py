"""The rwkvsam command: real runs on real images and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rwkvsam_core import build_model, save_checkpoint
from rwkvsam_core.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photograph (scikit-image's 'coffee', public domain) when available, else a synthetic image."""
    path = tmp_path_factory.mktemp("img") / "photo.png"
    try:
        from skimage import data

        img = data.coffee()[::4, ::4]
    except ImportError:
        img = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return path


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "rwkvsam_core.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_segment_box_and_points(photo, tmp_path):
    out = tmp_path / "mask.png"
    assert (
        main(
            ["segment", str(photo), "--box", "10", "10", "80", "60", "--image-size", "128", "--out", str(out)]
        )
        == 0
    )
    mask = np.asarray(Image.open(out))
    h, w = np.asarray(Image.open(photo)).shape[:2]
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    out2 = tmp_path / "pts.png"
    assert (
        main(
            [
                "segment",
                str(photo),
                "--point",
                "30",
                "30",
                "--negative",
                "70",
                "50",
                "--image-size",
                "128",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert out2.is_file()


@pytest.mark.parametrize(
    "prompt, candidates, multimask",
    [
        (["--box", "10", "10", "80", "60"], [], False),
        (["--point", "30", "30"], [], True),
        (["--point", "30", "30", "--negative", "70", "50"], [], False),
        (["--box", "10", "10", "80", "60"], ["--candidates", "best"], True),
        (["--point", "30", "30"], ["--candidates", "single"], False),
        (["--point", "30", "30"], ["--single-mask"], False),  # the old flag still works
    ],
)
def test_segment_candidates_follow_sams_rule(photo, tmp_path, monkeypatch, prompt, candidates, multimask):
    """One click alone decodes 3 candidates (the best is written); a box or several points the single mask."""
    from rwkvsam_core import predictor as predictor_module

    seen = []
    original = predictor_module.Predictor.predict

    def spy(self, *args, **kwargs):
        seen.append(kwargs["multimask_output"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(predictor_module.Predictor, "predict", spy)
    out = tmp_path / "m.png"
    argv = ["segment", str(photo), *prompt, *candidates, "--image-size", "64", "--out", str(out)]
    assert main(argv) == 0
    assert seen == [multimask] and out.is_file()


def test_segment_several_boxes(photo, tmp_path):
    out = tmp_path / "labels.png"
    args = [
        "segment",
        str(photo),
        "--box",
        "10",
        "10",
        "80",
        "60",
        "--box",
        "40",
        "20",
        "140",
        "90",
        "--image-size",
        "128",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    labels = np.asarray(Image.open(out))
    assert labels.ndim == 2 and set(np.unique(labels)) <= {0, 1, 2}
    assert main([*args[:-1], str(tmp_path / "sep.png"), "--separate"]) == 0
    assert (tmp_path / "sep_0.png").is_file() and (tmp_path / "sep_1.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "{missing}", "--box", "1", "1", "5", "5"], "image not found"),
        (["segment", "{text}", "--box", "1", "1", "5", "5"], "not an image"),
        (["segment", "{photo}", "--box", "10", "10", "5000", "60"], "outside"),
        (["segment", "{photo}", "--box", "50", "10", "20", "60"], "empty"),
        (["segment", "{photo}", "--point", "-3", "10"], "outside"),
        (["segment", "{photo}", "--box", "1", "1", "5", "5", "--model", "nope"], "unknown model"),
        (["segment", "{photo}"], "at least one"),
        (
            ["segment", "{photo}", "--box", "1", "1", "5", "5", "--checkpoint", "{missing}"],
            "checkpoint not found",
        ),
    ],
)
def test_bad_input_gives_one_line(photo, tmp_path, args, message):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fill = {"missing": tmp_path / "nope.png", "text": text, "photo": photo}
    argv = [a.format(**fill) for a in args] + ["--out", str(tmp_path / "o.png")]
    res = run(*argv)
    assert res.returncode == 2, res.stderr
    err_lines = [line for line in res.stderr.splitlines() if line.startswith("rwkvsam: error")]
    assert len(err_lines) == 1 and message in err_lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_embed_folder(photo, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.open(photo).save(folder / "a.png")
    Image.open(photo).rotate(90, expand=True).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    cache = tmp_path / "cache"
    # fixed weights: random ones differ per process and would (rightly) never hit the cache
    ckpt = save_checkpoint(build_model("rwkvsam_t", device="cpu", image_size=64), tmp_path / "t.safetensors")
    res = run("embed", folder, "--cache", cache, "--checkpoint", ckpt)
    assert res.returncode == 0, res.stderr
    assert len(list(cache.rglob("*.safetensors"))) == 2
    assert "skipped" in res.stderr and "broken.png" in res.stderr
    assert "2 computed, 0 already cached" in res.stderr
    res = run("embed", folder, "--cache", cache, "--checkpoint", ckpt)
    assert "0 computed, 2 already cached" in res.stderr


def test_info():
    res = run("info")
    assert res.returncode == 0, res.stderr
    assert "bi_wkv on cpu" in res.stdout and "rwkvsam_s" in res.stdout and "sam_vit_h" in res.stdout
    assert "encoder fused path (Triton kernels): " in res.stdout


def test_segment_zoom_writes_a_mask_and_rejects_points(photo, tmp_path):
    out = tmp_path / "z.png"
    argv = ["segment", str(photo), "--box", "10", "10", "30", "25", "--box", "5", "5", "120", "90"]
    assert main([*argv, "--zoom", "--image-size", "128", "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out))
    assert labels.shape == np.asarray(Image.open(photo)).shape[:2] and labels.max() <= 2
    res = run(
        "segment", photo, "--box", "10", "10", "30", "25", "--point", "15", "15", "--zoom", "--out", out
    )
    assert res.returncode == 2 and "--zoom works on boxes alone" in res.stderr
    res = run("segment", photo, "--box", "10", "10", "30", "25", "--zoom", "--zoom-target", "0", "--out", out)
    assert res.returncode == 2 and "--zoom-target" in res.stderr
