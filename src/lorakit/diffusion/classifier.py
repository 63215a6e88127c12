"""The concept classifier: the metric that plays CLIP's role in the composition papers.

A small CNN trained on the same digit images, plain and in every combination of the styles, with one head for
the digit class (10-way) and one sigmoid output per style (``thick``, ``inverted``, ...). A generated image
"shows" a concept when the digit head's argmax is that digit, or that style's probability exceeds 0.5.
Trained on 80% of the images; :func:`train_classifier` reports accuracies on the other 20%.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import FIELD, AdapterLoadError, ConfigError, LorakitError
from ..io.files import load_tensors, read_json, save_tensors_and_json
from .data import apply_styles, load_digit_images

CLASSIFIER_STYLES = ("thick", "inverted")


class ConceptClassifier(nn.Module):
    """(N, 1, H, W) images in [-1, 1] → (digit logits (N, 10), style logits (N, S)). Works for any H, W ≥ 8
    (global average pooling)."""

    def __init__(self, styles: tuple[str, ...] = CLASSIFIER_STYLES, width: int = 32):
        super().__init__()
        self.styles = tuple(styles)
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten())
        self.digit = nn.Linear(2 * width, 10)
        self.style = nn.Linear(2 * width, len(self.styles))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.digit(h), self.style(h)

    @torch.no_grad()
    def concepts(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"digit": (N,) predicted digit, <style>: (N,) bool} for images (N, 1, H, W)."""
        digit, style = self(images)
        out = {"digit": digit.argmax(dim=-1)}
        for i, s in enumerate(self.styles):
            out[s] = style[:, i] > 0
        return out


def _styled_set(images: torch.Tensor, labels: torch.Tensor, styles: tuple[str, ...]):
    xs, ds, ss = [], [], []
    for k in range(len(styles) + 1):
        for combo in itertools.combinations(styles, k):
            xs.append(apply_styles(images, combo))
            ds.append(labels)
            ss.append(torch.tensor([[float(s in combo) for s in styles]]).expand(len(labels), -1))
    return torch.cat(xs), torch.cat(ds), torch.cat(ss)


def train_classifier(out_dir: str | os.PathLike | None = None, *, size: int = 16, steps: int = 600,
                     batch_size: int = 128, seed: int = 0) -> tuple[ConceptClassifier, dict]:
    """Train on 80% of the digits in all style combinations; returns (classifier, held-out accuracies) and, with
    ``out_dir``, saves ``classifier.safetensors`` + ``classifier.json`` there. ConfigError for ``steps`` or
    ``batch_size`` below 1 (0 steps saved an untrained network as the metric)."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{FIELD} must be a positive integer, got {value!r}", field=name)
    images, labels = load_digit_images(size)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    cut = int(0.8 * len(images))
    train_x, train_d, train_s = _styled_set(images[perm[:cut]], labels[perm[:cut]], CLASSIFIER_STYLES)
    test_x, test_d, test_s = _styled_set(images[perm[cut:]], labels[perm[cut:]], CLASSIFIER_STYLES)
    torch.manual_seed(seed)
    model = ConceptClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch_size,), generator=g)
        x = train_x[idx] + 0.1 * torch.randn(train_x[idx].shape, generator=g)  # generated images are a little noisy
        digit, style = model(x.clamp(-1, 1))
        loss = F.cross_entropy(digit, train_d[idx]) + F.binary_cross_entropy_with_logits(style, train_s[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    pred = model.concepts(test_x)
    report = {"digit_accuracy": (pred["digit"] == test_d).float().mean().item()}
    for i, s in enumerate(CLASSIFIER_STYLES):
        report[f"{s}_accuracy"] = (pred[s] == test_s[:, i].bool()).float().mean().item()
    if out_dir is not None:
        out = Path(out_dir)
        save_tensors_and_json(out / "classifier.safetensors", model.state_dict(),
                              {out / "classifier.json": {"styles": list(CLASSIFIER_STYLES), **report}})
    return model, report


def load_classifier(folder: str | os.PathLike) -> ConceptClassifier:
    """A classifier saved by :func:`train_classifier` (safetensors only). Raises FileNotFoundError (no
    ``classifier.safetensors``) and LorakitError naming the file that is damaged or holds another network."""
    path = Path(folder) / "classifier.safetensors"
    retrain = f"retrain it with `lorakit diffusion train-classifier --out {folder}`"
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}; train it with `lorakit diffusion train-classifier`")
    try:
        meta = read_json(Path(folder) / "classifier.json")
        tensors = load_tensors(path)
    except AdapterLoadError as error:
        raise LorakitError(f"classifier {folder}: {error}; {retrain}") from None
    styles = meta.get("styles")
    if not isinstance(styles, list) or not all(isinstance(s, str) for s in styles):
        raise LorakitError(f"classifier {folder}: {Path(folder) / 'classifier.json'} has no \"styles\" list; {retrain}")
    model = ConceptClassifier(tuple(styles))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:  # missing / unexpected keys or shapes: weights of another network
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise LorakitError(f"classifier {folder}: {path} does not hold the concept classifier's weights "
                           f"({first[0].strip()}); {retrain}") from None
    return model.eval()


def concept_rates(classifier: ConceptClassifier, images: torch.Tensor, concepts: list[str]) -> dict[str, float]:
    """Fraction of ``images`` showing each concept (``digitD`` or a style name) and all of them (``both``)."""
    pred = classifier.concepts(images)
    hits = []
    for c in concepts:
        if c.startswith("digit") and c[5:].isdigit():
            hits.append(pred["digit"] == int(c[5:]))
        elif c in pred:
            hits.append(pred[c])
        else:
            raise ConfigError(f"the classifier knows digits (digit0..digit9) and styles {classifier.styles}, not {c!r}")
    out = {c: h.float().mean().item() for c, h in zip(concepts, hits)}
    out["all"] = torch.stack(hits).all(dim=0).float().mean().item()
    return out
