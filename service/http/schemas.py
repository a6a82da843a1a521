"""The JSON request and response shapes of /predict and /explain (and the admin API's /admin/serve).

The answers' models are what the OpenAPI document says of them (``service.http.openapi``): a field
added to an answer belongs in its model here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator, model_validator

from service.work import DEFAULT_METHOD, DEFAULT_QUADRATURE, Method, Quadrature


class Instance(BaseModel):
    """One image: encoded bytes in base64, or a 28x28 array of 0..255 numbers."""

    model_config = ConfigDict(extra="forbid")
    image_b64: str | None = None
    pixels: list[list[float]] | list[float] | None = None  # a flat list is refused by imaging, saying why

    @model_validator(mode="after")
    def _exactly_one(self) -> Instance:
        if (self.image_b64 is None) == (self.pixels is None):
            raise ValueError("give exactly one of 'image_b64' or 'pixels'")
        return self


INSTANCES = TypeAdapter(Annotated[list[Instance], Field(min_length=1)])


class PredictOptions(BaseModel):
    """/predict takes no options beside its instances; anything else is an unknown field."""

    model_config = ConfigDict(extra="forbid")


class ExplainOptions(PredictOptions):
    """What /explain computes; in JSON beside ``instances``, or as multipart form fields."""

    method: Method = DEFAULT_METHOD
    target: int | None = Field(None, ge=0, le=9, description="class to explain (default: the predicted one)")
    steps: int = Field(32, ge=1, description="integrated-gradients steps (at most the service's max_ig_steps)")
    quadrature: Quadrature = Field(
        DEFAULT_QUADRATURE,
        description="integrated gradients: `exact`, the path integral itself (this net is piecewise linear; `steps` "
                    "is then unused), or `midpoint`, the midpoint rule over `steps` (Captum's riemann_middle, for "
                    "comparison)",
    )
    top_k: int = Field(10, ge=1, le=100, description="hidden units listed per layer")
    heatmap: bool = False

    @field_validator("steps")
    @classmethod
    def _within_limit(cls, steps: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_ig_steps")
        if limit is not None and steps > limit:
            raise ValueError(f"steps must be at most {limit} (this service's max_ig_steps)")
        return steps


# ---- what the routes answer, for the OpenAPI document (``service.http.openapi``) and for tests


class PredictRequest(BaseModel):
    """``{"instances": [...]}``; multipart/form-data with ``file`` parts is the other way in."""

    model_config = ConfigDict(extra="forbid")
    instances: list[Instance] = Field(min_length=1)


class ExplainRequest(PredictRequest, ExplainOptions):
    """The instances and, beside them, what to compute."""


class ModelRef(BaseModel):
    name: str
    version: int


Flag = Literal["multiple_digits", "low_contrast", "not_a_digit", "no_digit"]


class Prediction(BaseModel):
    """One instance's answer; for a picture in which no digit is found (``no_digit``), label, confidence,
    probabilities and box are null and typicality is 0."""

    label: int | None = Field(ge=0, le=9)
    confidence: float | None = Field(ge=0, le=1)
    probabilities: list[float] | None = Field(min_length=10, max_length=10)
    typicality: float | None = Field(None, ge=0, le=1, description="share of held-out real digits less typical "
                                     "than this input (a conformal p-value); null: the version has no calibration")
    box: list[int] | None = Field(min_length=4, max_length=4, description="[x, y, width, height] of the digit in "
                                  "the client's picture (pixels; for `pixels` instances, in the 28x28 frame); null "
                                  "when no digit is found")
    flags: list[Flag] = Field(description="what made the framing unsure (multiple_digits, low_contrast), that the "
                                          "picture does not look like a digit (not_a_digit) or holds none (no_digit); "
                                          "empty when nothing did")


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction] = Field(description="one per instance, in request order")


class TopUnit(BaseModel):
    unit: int = Field(description="index of the hidden unit (0..499)")
    activation: float = Field(description="its output after the ReLU")
    contribution: float = Field(description="activation x fc2.weight[target, unit]: what it adds to the target logit")


class LayerSummary(BaseModel):
    name: str = Field(description="fc1 (the hidden layer before its ReLU), relu (after it), fc2 (the logits)")
    output_shape: list[int]
    mean_activation: float
    zero_fraction: float = Field(description="share of the layer's outputs that are <= 0")
    top_units: list[TopUnit] = Field(
        description="the units that pushed the target logit most, largest first (top_k of them). Listed for relu "
                    "only, by design: relu's units feed the logits directly, so each one's contribution is exact "
                    "and they add up to the logit; fc1 holds the same 500 units before the ReLU (a unit it cuts "
                    "contributes nothing, the others exactly what relu lists), and fc2's outputs are the ten "
                    "logits themselves (see probabilities). Empty for fc1 and fc2.")


class ConvergenceDelta(BaseModel):
    """How far integrated gradients are from complete (sum of attributions = f(x) - f(black)), f the
    target logit."""

    absolute: float = Field(description="sum(attributions) - (f(x) - f(baseline)), in logits")
    relative: float = Field(description="`absolute` / |f(x) - f(baseline)|, that denominator floored at 1e-6 "
                                        "(a logit that does not move gives a finite number)")


class Explanation(Prediction):
    """An explained instance; for ``no_digit`` every field but ``method`` and the prediction's is null."""

    method: Method
    target: int | None
    attributions: list[list[float]] | None = Field(description="28x28, in the frame of `input`")
    input: list[list[float]] | None = Field(description="the 28x28 image the model saw, 0..1")
    layers: list[LayerSummary] | None
    convergence_delta: ConvergenceDelta | None = Field(
        None, description="integrated gradients only: the completeness gap of these attributions")
    heatmap_png: str | None = Field(None, description="base64 PNG, with heatmap=true")


class ExplainResponse(BaseModel):
    model: ModelRef
    predictions: list[Explanation]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, and for an image which instance")


class KServeError(BaseModel):
    """The KServe protocols' (V1, V2, the repository's) errors."""

    error: str = Field(description="what is wrong")


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    share: float = Field(gt=0, lt=1, description="of unpinned requests")


class ShadowBody(BaseModel):
    """/admin/shadow: the version that also computes ``share`` of the served version's requests (null: stop)."""

    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(ge=1)
    share: float = Field(1.0, gt=0, le=1, description="of the served version's unpinned requests, on spare capacity")


class ServeBody(BaseModel):
    """/admin/serve: the version to serve, and optionally a canary beside it."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    canary: Canary | None = None
