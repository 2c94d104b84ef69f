"""The Flask app speaking Label Studio's ML-backend protocol.

Routes: ``GET /`` and ``GET /health`` (status), ``POST /setup`` (register a project, answer the
model version; never loads the model), ``POST /predict`` (interactive or batch), ``POST /webhook``
(annotation events, training), ``GET /metrics``. Basic auth, when configured, is enforced on every
route but ``/``, ``/health`` and ``/webhook`` (Label Studio sends its webhooks without credentials;
they only act for projects set up through /setup).
"""

from __future__ import annotations

import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException

from .convert import (
    ConversionError,
    LabelConfig,
    boxes_from_task,
    build_results,
    parse_context,
    parse_label_config,
)
from .images import ImageError, ImageLoader, task_image_url
from .model import get_manager
from .settings import Settings
from .training import Trainer, project_id

logger = logging.getLogger(__name__)

OPEN_ROUTES = {"/", "/health", "/webhook"}


class PredictionError(RuntimeError):
    """A request-level problem reported to Label Studio as a 400 with a message."""


class Backend:
    """The request-independent parts of the server (one per process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loader = ImageLoader(settings)
        self.trainer = Trainer(settings, self.loader)
        self.webhooks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkvsam-webhook")
        self.counters = {"predict_requests": 0, "tasks": 0, "errors": 0, "webhooks": 0}
        # a worker that died while training left its run behind: settle it (off the start-up path)
        self.webhooks.submit(self._recover_training)

    def _recover_training(self) -> None:
        try:
            self.trainer.recover_stale()
        except Exception:
            logger.exception("recovering an interrupted training run failed")

    @property
    def manager(self):
        return get_manager(self.settings)

    # ---------------------------------------------------------------------------- predict
    def label_config(self, payload: dict[str, Any]) -> LabelConfig:
        xml = payload.get("label_config")
        if not xml:
            entry = self.trainer.projects.get(project_id(payload.get("project")))
            xml = (entry or {}).get("label_config")
        if not xml:
            raise PredictionError("no label_config in the request and the project was not set up")
        try:
            return parse_label_config(xml)
        except ConversionError as exc:
            raise PredictionError(str(exc)) from exc

    def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        tasks = payload.get("tasks")
        if not isinstance(tasks, list):
            raise PredictionError("'tasks' must be a list")
        config = self.label_config(payload)
        params = payload.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        self.counters["predict_requests"] += 1
        interactive = bool(context and isinstance(context, dict) and context.get("result"))
        results = []
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            if interactive and i > 0:
                results.append(self._empty())
                continue
            try:
                if not isinstance(task, dict):
                    raise PredictionError("task is not an object")
                out = self._interactive(task, context, config) if interactive else self._batch(task, config)
            except (ImageError, ConversionError, PredictionError, ValueError) as exc:
                self.counters["errors"] += 1
                logger.warning(
                    "task %s: no prediction: %s", task.get("id") if isinstance(task, dict) else "?", exc
                )
                out = self._empty()
            except Exception:  # never crash the worker on one bad task
                self.counters["errors"] += 1
                logger.exception(
                    "task %s: prediction failed", task.get("id") if isinstance(task, dict) else "?"
                )
                out = self._empty()
            self.counters["tasks"] += 1
            logger.debug(
                "task %s done in %.3f s",
                task.get("id") if isinstance(task, dict) else "?",
                time.perf_counter() - t0,
            )
            results.append(out)
        return {"results": results, "model_version": self.manager.version}

    def _empty(self) -> dict[str, Any]:
        return {"result": [], "score": 0.0, "model_version": self.manager.version}

    def _interactive(
        self, task: dict[str, Any], context: dict[str, Any], config: LabelConfig
    ) -> dict[str, Any]:
        image = self.loader.load(task_image_url(task, config.image_key))
        h, w = image.shape[:2]
        prompt = parse_context(context, w, h)
        if prompt is None:
            return self._empty()
        mask, score, version = self.manager.segment_interactive(image, prompt)
        if mask is None:
            return self._empty()
        result = build_results(config, [mask], [prompt.label], [score])
        return {"result": result, "score": score, "model_version": version}

    def _batch(self, task: dict[str, Any], config: LabelConfig) -> dict[str, Any]:
        boxes = boxes_from_task(task, [t.name for t in config.rectangles] or None)
        if not boxes:
            logger.info("task %s: no rectangles to turn into masks", task.get("id"))
            return self._empty()
        image = self.loader.load(task_image_url(task, config.image_key))
        masks, labels, scores, version = self.manager.segment_boxes(image, boxes)
        result = build_results(config, masks, labels, scores)
        score = float(sum(scores) / len(scores)) if scores else 0.0
        return {"result": result, "score": score, "model_version": version}

    # ---------------------------------------------------------------------------- webhook
    def webhook(self, payload: dict[str, Any]) -> None:
        self.counters["webhooks"] += 1

        def work() -> None:
            try:
                logger.info("webhook: %s", self.trainer.handle_webhook(payload))
            except Exception:
                logger.exception("webhook %s failed", payload.get("action"))

        self.webhooks.submit(work)


def _json_error(status: int, message: str) -> Response:
    resp = jsonify({"status": "error", "error": message})
    resp.status_code = status
    return resp


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app. Nothing heavy happens here: the model loads on the first prediction."""
    settings = settings or Settings.from_env()
    app = Flask("labelstudio_backend")
    app.config["MAX_CONTENT_LENGTH"] = 512 * 1024 * 1024
    backend = Backend(settings)
    app.extensions["rwkvsam_backend"] = backend

    @app.before_request
    def _basic_auth() -> Response | None:
        if not settings.basic_auth_user or request.path in OPEN_ROUTES:
            return None
        auth = request.authorization
        ok = (
            auth is not None
            and hmac.compare_digest(auth.username or "", settings.basic_auth_user)
            and hmac.compare_digest(auth.password or "", settings.basic_auth_pass)
        )
        if ok:
            return None
        resp = _json_error(401, "basic auth required")
        resp.headers["WWW-Authenticate"] = 'Basic realm="rwkvsam"'
        return resp

    def body() -> dict[str, Any]:
        data = request.get_json(force=True, silent=False)
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "UP", "model_class": "RWKVSAM", "model_name": settings.model_name})

    @app.post("/setup")
    def setup() -> Response:
        data = body()
        pid = project_id(data.get("project"))
        schema = data.get("schema") or data.get("label_config") or ""
        try:
            parse_label_config(schema)
        except ConversionError as exc:
            logger.warning("setup refused for project %s: %s", pid, exc)
            return _json_error(400, f"unsupported labeling config: {exc}")
        if pid is not None:
            backend.trainer.projects.register(pid, schema)
        return jsonify({"model_version": backend.manager.version})

    @app.post("/predict")
    def predict() -> Response:
        data = body()
        try:
            return jsonify(backend.predict(data))
        except PredictionError as exc:
            logger.warning("predict refused: %s", exc)
            return _json_error(400, str(exc))

    @app.post("/webhook")
    def webhook() -> Response:
        data = body()
        action = data.get("action")
        if action not in (
            "ANNOTATION_CREATED",
            "ANNOTATION_UPDATED",
            "ANNOTATION_DELETED",
            "ANNOTATIONS_DELETED",
            "START_TRAINING",
        ):
            return jsonify({"status": "ignored", "action": action})
        backend.webhook(data)
        resp = jsonify({"status": "ok", "action": action})
        resp.status_code = 201
        return resp

    @app.get("/metrics")
    def metrics() -> Response:
        manager = get_manager(settings)
        train_state = backend.trainer.state()
        return jsonify(
            {
                **backend.counters,
                **manager.stats,
                "model_version": manager.version,
                "training": backend.trainer.running or bool(train_state.get("active")),
                "annotations_pending_training": int(train_state.get("new", 0)),
                "annotations_not_stored": train_state.get("skipped", {}),
            }
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _json_error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.path)
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}")

    return app
