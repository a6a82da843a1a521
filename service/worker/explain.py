"""Hook-based explanations for the FNN: attributions, per-layer activations and heatmaps.

One explain computation registers, on every layer, a forward hook (the layer's output) and a
full backward hook (the gradient of the explained logits with respect to that output), runs
one forward and one backward pass over the whole batch, and removes every hook through its
handle on the way out, also when something raises. Plain prediction therefore never runs
through a hook. Integrated gradients then integrate input gradients along the path from the
black image: exactly by default (the net is piecewise linear), or by the midpoint rule with plain
autograd, all images and steps batched together. Every integrated-gradients answer says how far
it is from complete: its ``convergence_delta``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from service.model.fnn import FNN, IMAGE_SIDE
from service.work import DEFAULT_QUADRATURE, METHODS, QUADRATURES
from service.worker.heatmap import render_png

LAYERS = ("fc1", "relu", "fc2")
# The one layer whose top units are listed: its units feed the logits directly, so their contributions
# are exact. fc1 is the same units before the ReLU (nothing new to list), fc2 the logits themselves.
HIDDEN_LAYER = "relu"
IG_CHUNK_ROWS = 8192  # interpolated images per forward/backward; bounds memory for large N * steps
# convergence_delta's relative gap divides by max(|f(x) - f(baseline)|, this): a change of the target
# logit smaller than this (in logits) is float32 rounding of the served model, not a signal to divide by.
DELTA_FLOOR = 1e-6


def hook_count(model: nn.Module) -> int:
    """All hooks of every kind on every submodule: 0 whenever no explain computation is running."""
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@dataclass
class _Recording:
    """What the hooks saw in one forward/backward pass, keyed by layer name, batch first."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)


def _keep_output(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        store[name] = output.detach()

    return hook


def _keep_output_grad(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, grad_input: tuple[torch.Tensor, ...], grad_output: tuple[torch.Tensor, ...]) -> None:
        store[name] = grad_output[0].detach()

    return hook


@contextmanager
def _hooked(model: FNN) -> Iterator[_Recording]:
    """Forward and backward hooks on every layer for the block only; the handles remove them on any exit."""
    recording = _Recording()
    with ExitStack() as handles:
        for name in LAYERS:
            layer = getattr(model, name)
            handles.enter_context(layer.register_forward_hook(_keep_output(recording.outputs, name)))
            handles.enter_context(layer.register_full_backward_hook(_keep_output_grad(recording.output_grads, name)))
        yield recording


def _check_request(method: str, targets: list[int | None], n_images: int, num_classes: int, steps: int, top_k: int,
                   quadrature: str) -> None:
    """Reject what the schema should already have stopped, with a message, before any hook exists."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if quadrature not in QUADRATURES:
        raise ValueError(f"unknown quadrature {quadrature!r}; expected one of {', '.join(QUADRATURES)}")
    if len(targets) != n_images:
        raise ValueError(f"got {len(targets)} targets for {n_images} images; "
                         "give one per image (None = predicted class)")
    bad = [t for t in targets if t is not None and not 0 <= t < num_classes]
    if bad:
        raise ValueError(f"targets must be classes 0..{num_classes - 1} or None, got {bad}")
    if steps < 1 or top_k < 1:
        raise ValueError(f"steps and top_k must be at least 1, got steps={steps}, top_k={top_k}")


def _top_units(activations: torch.Tensor, output_grads: torch.Tensor, top_k: int) -> list[list[dict[str, Any]]]:
    """Per image, the hidden units with the largest contribution to the target logit.

    contribution = activation * d logit_target / d activation, which for the hidden layer is
    activation * fc2.weight[target, unit]. A stable sort keeps ties (dead units) in unit order,
    so an image gets the same list whether it is explained alone or in a batch.
    """
    contributions = activations * output_grads
    order = torch.sort(contributions, dim=1, descending=True, stable=True).indices[:, :top_k]
    rows = zip(order.tolist(), activations.gather(1, order).tolist(), contributions.gather(1, order).tolist())
    return [
        [{"unit": u, "activation": a, "contribution": c} for u, a, c in zip(units, acts, contribs)]
        for units, acts, contribs in rows
    ]


def _layer_summaries(recording: _Recording, top_k: int) -> list[list[dict[str, Any]]]:
    """Per image, one summary per layer in forward order; only the hidden layer lists top units."""
    per_layer = []
    for name in LAYERS:
        output = recording.outputs[name]
        units = (
            _top_units(output, recording.output_grads[name], top_k)
            if name == HIDDEN_LAYER
            else [[] for _ in range(len(output))]
        )
        per_layer.append([
            {
                "name": name,
                "output_shape": list(output.shape[1:]),
                "mean_activation": mean,
                "zero_fraction": zeros,
                "top_units": top,
            }
            for mean, zeros, top in zip(output.mean(1).tolist(), (output <= 0).float().mean(1).tolist(), units)
        ])
    return [list(layers) for layers in zip(*per_layer)]


def _open_fraction(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Share of alpha in [0, 1] for which start + alpha * (end - start) > 0, element-wise."""
    crossing = (start / (start - end)).nan_to_num(0.0).clamp(0, 1)
    rising = torch.where(end > start, 1 - crossing, crossing)
    return torch.where((start > 0) & (end > 0), 1.0, torch.where((start <= 0) & (end <= 0), 0.0, rising))


class _Path:
    """The straight path from the baseline to each image, in float64 from the model's own weights.

    One forward over the images and the baseline together (N + 1 rows) gives what integrated
    gradients need besides the gradients: each image's target-logit change f(x) - f(baseline),
    and the hidden pre-activations at both ends of the path, from which the exact integral
    follows. Float64 so that a gap it reports is the quadrature's, not float32 rounding's (the
    served float32 logits differ from these by up to about 1e-5).
    """

    def __init__(self, model: FNN, x: torch.Tensor, baseline: float, target: torch.Tensor):
        self.target = target
        self.w1 = model.fc1.weight.detach().double()
        self.w2 = model.fc2.weight.detach().double()
        ends = torch.cat([torch.full_like(x[:1], baseline), x]).double()  # row 0: the baseline
        self.span = ends[1:] - ends[:1]  # x - baseline
        pre = ends @ self.w1.T + model.fc1.bias.detach().double()
        self.start, self.end = pre[:1], pre[1:]
        self.logits = torch.relu(pre) @ self.w2.T + model.fc2.bias.detach().double()  # (N + 1, classes)

    def logit_change(self) -> torch.Tensor:
        """f(x) - f(baseline) per image, f the image's target logit: (N,) float64."""
        return (self.logits[1:] - self.logits[:1]).gather(1, self.target[:, None]).squeeze(1)

    def exact_attributions(self) -> torch.Tensor:
        """Integrated gradients with no quadrature error, for Linear -> ReLU -> Linear: (N, 784) float64.

        Along the straight path each hidden unit's pre-activation is linear in alpha, so the unit
        is open on a known fraction of [0, 1] and the input gradient is piecewise constant (about
        250 pieces per MNIST digit, which is why a uniform grid of a few dozen steps misses by up
        to a few percent). The path-averaged gradient is therefore that of the net whose ReLU
        gates are those fractions: fc1.weight^T (fraction * fc2.weight[target]).
        """
        fraction = _open_fraction(self.start, self.end)
        return self.span * ((fraction * self.w2[self.target]) @ self.w1)


def _convergence_delta(attributions: torch.Tensor, change: torch.Tensor) -> list[dict[str, float]]:
    """Per image, how far integrated gradients are from complete: ``absolute`` = sum(attributions) -
    (f(x) - f(baseline)) in logits, and ``relative`` = that / |f(x) - f(baseline)|, the denominator
    floored at DELTA_FLOOR (so an image whose target logit does not move gets a finite number, 0 for
    attributions that are all 0)."""
    absolute = attributions.double().sum(1) - change
    relative = absolute / change.abs().clamp_min(DELTA_FLOOR)
    return [{"absolute": a, "relative": r} for a, r in zip(absolute.tolist(), relative.tolist())]


class Explainer:
    """Explains batches of normalised images for one model; the server builds one per worker.

    Hooks go on the model object itself, so it must not serve plain predictions from another
    thread while an explanation runs (the service gives explain its own worker pool).
    """

    def __init__(self, model: FNN, mean: float, std: float):
        self.model = model
        self.mean = mean
        self.std = std
        # The integrated-gradients start: the black image, normalised to the float32 value a black pixel
        # becomes in service.imaging.normalize, so that f(baseline) is the model's answer for a black picture.
        self.baseline = float((np.float32(0.0) - np.float32(mean)) / np.float32(std))

    def explain(
        self, x: torch.Tensor, method: str, targets: list[int | None], steps: int, top_k: int, heatmap: bool,
        quadrature: str = DEFAULT_QUADRATURE,
    ) -> list[dict[str, Any]]:
        """x: (N, 784) normalised images on the model's device (several requests may share a batch).

        targets[i] is the class to explain for image i, None for its predicted class. Returns one
        JSON-ready dict per image; integrated gradients add ``convergence_delta`` (see
        ``_convergence_delta``). Gradients are switched on and inference mode off for this work,
        so it may be called inside torch.inference_mode() or torch.no_grad(), but the model's
        parameters must be ordinary tensors (not created under inference mode).
        """
        _check_request(method, targets, len(x), self.model.num_classes, steps, top_k, quadrature)
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().float()  # an ordinary tensor even if the caller made x under inference mode
            with _hooked(self.model) as recording:
                probabilities, gradient, target = self._forward_backward(x, targets)
            deltas: list[dict[str, float]] | None = None
            if method != "integrated_gradients":
                attributions = self._attributions(x, gradient, method)
            else:
                path = _Path(self.model, x, self.baseline, target)
                if quadrature == "exact":
                    attributions = path.exact_attributions()
                else:
                    attributions = (x - self.baseline) * self._mean_path_gradient(x, target, steps)
                deltas = _convergence_delta(attributions, path.logit_change())
        layers = _layer_summaries(recording, top_k)
        return self._reports(x, probabilities, attributions, target, method, layers, heatmap, deltas)

    def _forward_backward(self, x: torch.Tensor,
                          targets: list[int | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward and one backward over the batch: probabilities, d logit_target / d x, and the targets."""
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        probabilities = torch.softmax(logits.detach(), dim=1)
        requested = torch.tensor([-1 if t is None else t for t in targets], device=x.device)
        target = torch.where(requested < 0, probabilities.argmax(1), requested)
        # The images are independent rows, so the gradient of the sum is each image's own gradient.
        logits.gather(1, target[:, None]).sum().backward(inputs=[x])
        assert x.grad is not None
        return probabilities, x.grad, target

    @staticmethod
    def _attributions(x: torch.Tensor, gradient: torch.Tensor, method: str) -> torch.Tensor:
        return gradient.abs() if method == "saliency" else gradient * x

    def _mean_path_gradient(self, x: torch.Tensor, target: torch.Tensor, steps: int) -> torch.Tensor:
        """Mean input gradient at baseline + alpha * (x - baseline), alpha = (k + 0.5) / steps (midpoint rule).

        Row r of the flattened (image, step) grid is image r // steps at step r % steps; rows are
        processed in chunks so that any N * steps fits in memory.
        """
        x = x.detach()
        delta = x - self.baseline
        alphas = (torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps
        total = torch.zeros_like(x)
        for rows in torch.arange(len(x) * steps, device=x.device).split(IG_CHUNK_ROWS):
            image = rows // steps
            points = (self.baseline + alphas[rows % steps, None] * delta[image]).requires_grad_(True)
            selected = self.model(points).gather(1, target[image, None]).sum()
            (gradient,) = torch.autograd.grad(selected, points)
            total.index_add_(0, image, gradient)
        return total / steps

    def _reports(
        self,
        x: torch.Tensor,
        probabilities: torch.Tensor,
        attributions: torch.Tensor,
        target: torch.Tensor,
        method: str,
        layers: list[list[dict[str, Any]]],
        heatmap: bool,
        deltas: list[dict[str, float]] | None,
    ) -> list[dict[str, Any]]:
        """One JSON-ready dict per image; tensors leave the device once, as whole-batch lists."""
        side = (len(x), IMAGE_SIDE, IMAGE_SIDE)
        images = (x.detach() * self.std + self.mean).reshape(side).cpu()
        maps = attributions.detach().reshape(side).cpu()
        confidence, label = probabilities.max(1)
        reports = []
        for i, (lab, conf, probs, tgt) in enumerate(
            zip(label.tolist(), confidence.tolist(), probabilities.tolist(), target.tolist())
        ):
            report = {
                "label": lab,
                "confidence": conf,
                "probabilities": probs,
                "method": method,
                "target": tgt,
                "attributions": maps[i].tolist(),
                "input": images[i].tolist(),
                "layers": layers[i],
            }
            if deltas is not None:
                report["convergence_delta"] = deltas[i]
            if heatmap:
                report["heatmap_png"] = base64.b64encode(render_png(maps[i].numpy(), images[i].numpy())).decode("ascii")
            reports.append(report)
        return reports
