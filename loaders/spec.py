"""The one augmentation spec every loader honours (the report's list, in its order).

Report, "Data Augmentation": horizontal flip; pad 4 then random crop to 128; rotation up to
30 degrees; colour jitter; grayscale p=0.2; affine translation up to 25%; perspective
distortion 0.3 with p=0.5; normalisation with mean (125,124,115)/255, std (60,59,64)/255.
Images are resized to the training size before any augmentation (photos: `resize` "rrc",
`eval_resize` "center" by flag; docs/datasets.md, "Photos of any size").

Decisions the report leaves open (stated here, honoured by every loader):
- colour jitter: brightness 0.2, contrast 0.2, saturation 0.2, hue 0.05 (torchvision
  ColorJitter semantics: factors drawn uniformly in [1-b, 1+b], hue shift in [-h, h] turns);
  mild values because the report warns that too-hard augmentation stops this model
  converging.
- interpolation: bilinear for every geometric op (torchvision's defaults differ per op:
  nearest for rotation/affine, bilinear for perspective); zero (black) fill outside the image.
- `colour_mode` (augment.py): "fast" (default: one colour matrix, no clamps between ops) or
  "exact" (torchvision's ops). Grey is `LUMA`, torchvision's weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace

# Switch names, in the report's order. Each is a bool field on the spec.
AUGMENTATIONS = ("flip", "crop", "rotate", "jitter", "grayscale", "translate", "perspective")
COLOUR_MODES = ("fast", "exact")
RESIZES = ("stretch", "rrc")          # training
EVAL_RESIZES = ("stretch", "center")  # evaluation

LUMA = (0.2989, 0.587, 0.114)   # grey = LUMA . RGB: torchvision's rgb_to_grayscale weights
MEAN = (125 / 255, 124 / 255, 115 / 255)
STD = (60 / 255, 59 / 255, 64 / 255)


@dataclass(frozen=True)
class AugmentSpec:
    size: int = 128                  # training resolution (square); inputs are resized to it first
    flip: bool = True
    flip_p: float = 0.5
    crop: bool = True
    crop_padding: int = 4            # zero pad on every side, then random crop back to `size`
    rotate: bool = True
    rotate_degrees: float = 30.0     # angle uniform in [-d, d]
    jitter: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    grayscale: bool = True
    grayscale_p: float = 0.2
    translate: bool = True
    translate_frac: float = 0.25     # shift uniform in [-f*size, f*size] on each axis
    perspective: bool = True
    perspective_distortion: float = 0.3
    perspective_p: float = 0.5
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    # augment.py's colour work (resident, FFCV): "fast" = jitter + grayscale as one per-sample
    # 3x3 matrix + offset (no clamps between ops, YIQ hue rotation); "exact" = torchvision's
    # ops one by one. DALI always uses its own (fast-like); the reference is always exact.
    colour_mode: str = "fast"
    # Resize policy (module docstring): training, then evaluation.
    resize: str = "stretch"
    rrc_scale: tuple[float, float] = (0.08, 1.0)    # crop area fraction range
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect (w/h) range
    eval_resize: str = "stretch"
    eval_crop_frac: float = 0.875                    # centre crop / short side (ImageNet's)

    def __post_init__(self):
        problems = []
        if self.size < 8:
            problems.append(f"size={self.size} (need >= 8)")
        for name in ("flip_p", "grayscale_p", "perspective_p", "perspective_distortion"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name}={v} (need 0..1)")
        if not 0.0 <= self.hue <= 0.5:
            problems.append(f"hue={self.hue} (need 0..0.5)")
        for name in ("brightness", "contrast", "saturation", "rotate_degrees", "crop_padding",
                     "translate_frac"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} (need >= 0)")
        if self.colour_mode not in COLOUR_MODES:
            problems.append(f"colour_mode={self.colour_mode!r} (need one of {', '.join(COLOUR_MODES)})")
        if self.resize not in RESIZES:
            problems.append(f"resize={self.resize!r} (need one of {', '.join(RESIZES)})")
        if self.eval_resize not in EVAL_RESIZES:
            problems.append(f"eval_resize={self.eval_resize!r} (need one of {', '.join(EVAL_RESIZES)})")
        lo_hi = lambda v: len(v) == 2 and 0 < v[0] <= v[1]   # noqa: E731
        if not (lo_hi(self.rrc_scale) and self.rrc_scale[1] <= 1):
            problems.append(f"rrc_scale={self.rrc_scale} (need two values 0 < min <= max <= 1)")
        if not lo_hi(self.rrc_ratio):
            problems.append(f"rrc_ratio={self.rrc_ratio} (need two values 0 < min <= max)")
        if not 0 < self.eval_crop_frac <= 1:
            problems.append(f"eval_crop_frac={self.eval_crop_frac} (need 0 < f <= 1)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean/std need 3 values each, std > 0")
        if problems:
            raise ValueError("invalid augmentation spec: " + ", ".join(problems))

    @property
    def any_enabled(self) -> bool:
        """Training draws random parameters: an augmentation is on, or the resize is "rrc"."""
        return self.resize == "rrc" or any(getattr(self, a) for a in AUGMENTATIONS)

    @property
    def eval_size(self) -> int:
        """The short side evaluation resizes to before its centre crop ("center")."""
        return int(round(self.size / self.eval_crop_frac))

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(a for a in AUGMENTATIONS if getattr(self, a))

    def without(self, *names: str) -> "AugmentSpec":
        """A copy with the named augmentations switched off (all of them when none is named);
        the resize policy is kept."""
        names = names or AUGMENTATIONS
        unknown = [n for n in names if n not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown}; known: {', '.join(AUGMENTATIONS)}")
        return replace(self, **{n: False for n in names})

    def only(self, *names: str) -> "AugmentSpec":
        return self.without(*[a for a in AUGMENTATIONS if a not in names]) if names else self.without()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
