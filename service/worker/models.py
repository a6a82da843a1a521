"""The model versions one worker holds, kept in step with the version board.

A version is loaded (verified by the store, warmed up) when the board lists it or the admin path
asks this worker to prepare it, and dropped (its memory freed) when neither holds any longer. A
worker started after two switches therefore comes up holding what is served now.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service import metrics
from service.config import Settings
from service.errors import HttpError
from service.model import static, store
from service.model.calibration import calibrated
from service.model.fnn import INPUT_SIZE
from service.versions import Board, Runtimes
from service.work import Control, Pool
from service.worker.explain import Explainer

log = logging.getLogger("digitserve")


@dataclass
class Held:
    """One loaded version: the model, what the answers call it, and its explainer (explain workers).

    ``features`` is the one forward the predict path calls, x -> (hidden, logits): the eager module's
    or the static graph's (``runtime``), chosen once when the version is loaded, never mid-flight."""

    loaded: store.LoadedModel
    ref: dict[str, object]
    explainer: Explainer | None
    features: static.Features
    runtime: str

    def outputs(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (calibrated where the version is) and typicality (None where it has no calibration)."""
        probabilities, typicality = calibrated(self.loaded.calibration, *self.features(x))
        return probabilities.cpu().numpy(), None if typicality is None else typicality.cpu().numpy()


class Models:
    def __init__(self, settings: Settings, board: Board, runtimes: Runtimes, pool: str, device: torch.device,
                 explains: bool):
        self.settings, self.board, self.runtimes, self.pool = settings, board, runtimes, pool
        self.device, self.explains = device, explains
        self.held: dict[int, Held] = {}
        self.prepared: set[int] = set()  # loaded on the admin path's request, not yet on the board
        self._seq = -1

    def sync(self, strict: bool = False) -> None:
        """Hold exactly the board's versions (and those being prepared); cheap when the board is unchanged.

        A version this worker cannot load is logged and left out (its requests get 409 here), unless
        ``strict``: at set-up, a worker that cannot hold what is served must not start."""
        state = self.board.read()
        if state.seq == self._seq:
            return
        self._seq = state.seq
        self.prepared -= set(state.loaded)
        for version in state.loaded:
            if version not in self.held:
                try:
                    self._load(version)
                except store.StoreError:
                    if strict:
                        raise
                    log.exception("cannot hold v%d, which the board lists", version)
        for version in [v for v in self.held if v not in state.loaded and v not in self.prepared]:
            self._drop(version)

    def get(self, version: int) -> Held:
        held = self.held.get(version)
        if held is None:
            raise HttpError(409, f"version {version} is not loaded (any more); retry unpinned")
        return held

    def control(self, command: Control) -> str:
        """The admin path's ``prepare`` (load and warm up, before the board lists the version) and ``drop``."""
        if command.op == "prepare":
            if command.version not in self.held:
                self._load(command.version)
            self.prepared.add(command.version)
        elif command.op == "drop":
            self.prepared.discard(command.version)
            self._seq = -1  # let sync decide with the board as it is now
            self.sync()
        else:
            raise ValueError(f"unknown control {command.op!r}")
        return f"{command.op} {command.version}: done"

    def _load(self, version: int) -> None:
        loaded = store.load(self.settings.store, self.settings.model, version, self.device)
        features, runtime = self._features(loaded)
        with torch.inference_mode():  # one real inference before it serves, so no client pays for it
            features(torch.zeros(2, INPUT_SIZE, device=self.device))
        norm = loaded.metadata.normalization
        explainer = Explainer(loaded.model, norm.mean, norm.std) if self.explains else None
        ref: dict[str, object] = {"name": loaded.name, "version": loaded.version}
        self.held[version] = Held(loaded, ref, explainer, features, runtime)
        self._info(loaded.name, version, runtime).set(1)
        log.debug("worker holds %s v%d on %s (%s)", loaded.name, version, self.device, runtime)

    def _features(self, loaded: store.LoadedModel) -> tuple[static.Features, str]:
        """The static graph where ``--runtime export`` asks for it and it passes its parity check, else the
        eager module, loudly (log, /info, metric). /explain keeps the eager module: its hooks need it."""
        eager = static.FeatureNet(loaded.model).eval()
        if self.settings.runtime == "eager" or self.explains:
            self.runtimes.record(self.pool, loaded.version, "eager")
            return eager, "eager"
        try:
            compiled = static.load(loaded, self.device)
            static.check_parity(loaded, eager, compiled, self.device)
        except static.Refused as e:
            log.warning("v%d serves eager, not its static graph (%s): %s", loaded.version, e.reason, e)
            metrics.labelled(metrics.RUNTIME_FALLBACK, str(loaded.version), e.reason).inc()
            self.runtimes.record(self.pool, loaded.version, "eager", f"{e.reason}: {e}")
            return eager, "eager"
        self.runtimes.record(self.pool, loaded.version, "export")
        return compiled, "export"

    def _info(self, name: str, version: int, runtime: str) -> Any:
        pool = Pool(self.pool).label
        return metrics.labelled(metrics.MODEL_INFO, name, str(version), self.device.type, pool, runtime)

    def _drop(self, version: int) -> None:
        held = self.held.pop(version)
        self._info(held.loaded.name, version, held.runtime).set(0)
        self.runtimes.record(self.pool, version, None)
        del held
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.debug("worker dropped v%d", version)
