"""The JSON request and response shapes of /predict and /explain."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator, model_validator

Method = Literal["saliency", "gradient_x_input", "integrated_gradients"]


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

    method: Method = "integrated_gradients"
    target: int | None = Field(None, ge=0, le=9, description="class to explain (default: the predicted one)")
    steps: int = Field(32, ge=1, description="integrated-gradients steps (at most the service's max_ig_steps)")
    quadrature: Literal["midpoint", "exact"] = Field(
        "exact", description="integrated gradients: `exact`, the path integral itself (this net is piecewise "
                             "linear; `steps` is then unused), or `midpoint`, the midpoint rule over `steps` "
                             "(Captum's riemann_middle, for comparison)"
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
    box: list[int] | None = Field(None, description="[x, y, width, height] of the digit in the client's picture")
    flags: list[Flag] = Field(default_factory=list)


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction] = Field(description="one per instance, in request order")


class TopUnit(BaseModel):
    unit: int
    activation: float
    contribution: float


class LayerSummary(BaseModel):
    name: str
    output_shape: list[int]
    mean_activation: float
    zero_fraction: float
    top_units: list[TopUnit]


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
