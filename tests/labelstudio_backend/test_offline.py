"""Offline pre-annotation / pre-computation (with a stand-in for Label Studio's REST API), settings, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from ls_helpers import CONFIG, local, rect, shipped_version

from labelstudio_backend.images import LabelStudioAuth
from labelstudio_backend.offline import preannotate, precompute, shard
from labelstudio_backend.settings import Settings


class FakeLabelStudio:
    """The three REST calls the offline commands make, answered from memory."""

    def __init__(self, tasks):
        self._tasks = tasks
        self.imported: list[dict] = []
        self.auth = LabelStudioAuth("http://127.0.0.1:9", "token")

    def project(self, pid):
        return {"id": pid, "label_config": CONFIG}

    def tasks(self, pid, page_size=100):
        yield from self._tasks

    def import_predictions(self, pid, predictions):
        self.imported.extend(predictions)
        return {"created": len(predictions)}


def _tasks():
    boxes = [rect(10, 10, 30, 30, "cat"), rect(50, 40, 30, 40, "dog")]
    return [
        {"id": 1, "data": {"image": local("a.png")}, "annotations": [{"id": 1, "result": boxes}]},
        {"id": 2, "data": {"image": local("b.png")}, "predictions": [{"id": 3, "result": boxes[:1]}]},
        {"id": 3, "data": {"image": local("a.png")}},  # no boxes
        {"id": 4, "data": {"image": local("truncated.png")}, "predictions": [{"id": 4, "result": boxes}]},
    ]


def test_preannotate_imports_masks_and_resumes(settings, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ls = FakeLabelStudio(_tasks())
    counts = preannotate(settings, 1, batch=1, show_progress=False, client=ls)
    assert counts == {"tasks": 4, "done": 2, "skipped": 0, "failed": 1, "no_boxes": 1, "masks": 3}
    by_task = {p["task"]: p for p in ls.imported}
    assert sorted(by_task) == [1, 2]
    assert [r["value"]["brushlabels"] for r in by_task[1]["result"]] == [["cat"], ["dog"]]
    assert all(p["model_version"] == shipped_version() for p in ls.imported)
    # a second run skips what is done (the failed task is retried, and fails again)
    again = FakeLabelStudio(_tasks())
    counts = preannotate(settings, 1, show_progress=False, client=again)
    assert counts["done"] == 0 and counts["skipped"] == 3 and counts["failed"] == 1 and again.imported == []
    # tasks that already hold a prediction of the current version are skipped without the progress file
    tasks = _tasks()[:2]
    tasks[0]["predictions"] = [{"id": 9, "model_version": shipped_version(), "result": []}]
    third = FakeLabelStudio(tasks)
    counts = preannotate(settings, 1, resume=False, show_progress=False, client=third)
    assert counts["skipped"] == 1 and counts["done"] == 1


def test_preannotate_shards_by_rank(settings, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert shard() == (1, 2, 1)
    ls = FakeLabelStudio(_tasks())
    counts = preannotate(settings, 1, show_progress=False, client=ls)
    assert counts["tasks"] == 2  # tasks 2 and 4 of the id-sorted list
    assert [p["task"] for p in ls.imported] == [2]


def test_precompute_fills_the_disk_cache(settings, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    counts = precompute(settings, 1, show_progress=False, client=FakeLabelStudio(_tasks()))
    # a.png twice (the second time from the cache), b.png once, the truncated file fails
    assert counts == {"tasks": 4, "encoded": 2, "cached": 1, "failed": 1}
    assert list((Path(settings.model_dir) / "embeddings").rglob("*.safetensors"))


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080/")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("ALLOWED_IMAGE_HOSTS", "A.example.org, b.example.org:8000")
    monkeypatch.setenv("CLIP_TO_BOX", "0")
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    s = Settings.from_env(threads=7)
    assert s.label_studio_url == "http://ls:8080" and s.model_dir == tmp_path and s.document_root == tmp_path
    assert s.allowed_hosts == ("a.example.org", "b.example.org:8000") and not s.clip_to_box
    assert (s.workers, s.threads) == (3, 7)
    monkeypatch.setenv("WORKERS", "many")
    with pytest.raises(ValueError, match="WORKERS"):
        Settings.from_env()
    monkeypatch.delenv("WORKERS")
    with pytest.raises(TypeError):
        Settings.from_env(nonsense=1)


def test_zoom_target_from_env(monkeypatch):
    assert Settings.from_env().zoom_target == 0.0  # off unless asked
    monkeypatch.setenv("ZOOM_TARGET", "384")
    s = Settings.from_env()
    assert s.zoom_target == 384.0 and s.to_env()["ZOOM_TARGET"] == "384"
    monkeypatch.setenv("ZOOM_TARGET", s.to_env()["ZOOM_TARGET"])  # what gunicorn workers read back
    assert Settings.from_env().zoom_target == 384.0
    for bad in ("big", "-1", "inf", "nan"):
        monkeypatch.setenv("ZOOM_TARGET", bad)
        with pytest.raises(ValueError, match="ZOOM_TARGET"):
            Settings.from_env()


def test_cli_arguments(monkeypatch, capsys):
    from labelstudio_backend.cli import build_parser, main, settings_from_args

    with pytest.raises(SystemExit):
        build_parser().parse_args(["preannotate"])  # --project is required
    args = build_parser().parse_args(["serve", "--port", "9999", "--workers", "2", "--model-dir", "/tmp/x"])
    s = settings_from_args(args)
    assert s.workers == 2 and str(s.model_dir) == "/tmp/x"
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    assert main(["precompute", "--project", "1"]) == 1
    assert "LABEL_STUDIO_URL" in capsys.readouterr().err


def test_rwkvsam_subcommand_plugin(capsys):
    import argparse

    from labelstudio_backend.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["labelstudio", "preannotate", "--project", "x"])
    with pytest.raises(SystemExit):
        args.func(args)  # our own parser validates the remaining arguments
    assert "invalid int value" in capsys.readouterr().err


def test_preannotate_counts_predictions_label_studio_drops(settings, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    class Rejecting(FakeLabelStudio):
        def import_predictions(self, pid, predictions):
            self.imported.extend(predictions)
            return {"created": len(predictions) - 1}  # LS 1.23 drops invalid ones and answers 201

    ls = Rejecting(_tasks()[:2])
    counts = preannotate(settings, 1, batch=16, show_progress=False, client=ls)
    assert counts["done"] == 1 and counts["failed"] == 1
    # nothing of that batch is marked finished: a rerun retries both tasks
    again = FakeLabelStudio(_tasks()[:2])
    assert preannotate(settings, 1, show_progress=False, client=again)["done"] == 2
