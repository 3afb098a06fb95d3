"""How a digit class becomes the engines' conditioning inputs.

A class-label model (DiT) takes the label itself: its one conditioning input is
``class_labels``. A text-conditioned family (SD3) takes embeddings instead; a digit
model of such a family ships its "text encoder" next to its weights: a learned table
per conditioning input, one row per class and a last row for the null class (the empty
prompt of classifier-free guidance), trained jointly with the transformer
(``tools/train_digits.py --family sd3``).

The table file (``class_conditioning.safetensors`` in the model's ``save_pretrained``
folder) is keyed by step-input name. The manifest's ``inputs`` of role ``conditioning``
decide what is fed: every one of them needs a table of that name whose rows have the
input's per-sample shape; a table no input takes, or an input with no table, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fora_export.errors import ConfigError
from fora_runtime.dtypes import numpy_dtype
from fora_runtime.manifest import InputSpec, Manifest

#: The table file in a model folder (beside config.json and the weights).
CLASS_CONDITIONING_FILE = "class_conditioning.safetensors"
#: Recorded in the file's metadata, so a stray safetensors file is not taken for a table.
TABLE_FORMAT = "fora-export class conditioning"


def save_class_conditioning(tables: dict[str, Any], folder: Path, *, null_class: int) -> Path:
    """Write ``{input name: [classes + 1, ...] tensor}`` into ``folder`` (float32)."""
    from safetensors.torch import save_file

    path = Path(folder) / CLASS_CONDITIONING_FILE
    tensors = {name: table.detach().float().contiguous() for name, table in tables.items()}
    save_file(tensors, str(path), metadata={"format": TABLE_FORMAT, "null_class": str(null_class)})
    return path


def load_class_conditioning(path: Path, where: str) -> tuple[dict[str, np.ndarray], int]:
    """The tables of a class-conditioning file and its null class, or the one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tables = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for broken files
        raise ConfigError(
            f"{where} | cannot read {path} ({err}) | retrain the model: python tools/train_digits.py"
        ) from err
    if metadata.get("format") != TABLE_FORMAT or not metadata.get("null_class", "").isdigit():
        raise ConfigError(
            f"{where} | {path} is not a class-conditioning table (metadata {metadata}) "
            "| write it with tools/train_digits.py"
        )
    return tables, int(metadata["null_class"])


@dataclass(frozen=True)
class ClassConditioning:
    """The conditioning feeds of a generation, per class label."""

    #: Step-input name -> table [classes + 1, *per-sample shape] (in the input's dtype);
    #: empty for class-label models, which take the labels as they are.
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    #: The input that takes the labels themselves (class-label models), else None.
    label_input: str | None = None
    #: What the feeds are, for the report.
    source: str = "class labels"

    def feeds(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Every conditioning input of the engines for these labels."""
        labels = np.asarray(labels, np.int64)
        feeds = {name: table[labels] for name, table in self.tables.items()}
        if self.label_input is not None:
            feeds[self.label_input] = labels
        return feeds


def class_conditioning(
    manifest: Manifest, num_classes: int, where: str, model_folder: Path | None
) -> ClassConditioning:
    """How classes ``0..num_classes-1`` are fed to these engines (see the module docstring).

    ``model_folder`` is the folder the engines were built from (None: a built-in model
    with no folder), where a text-conditioned digit model keeps its table."""
    inputs = manifest.inputs_of("conditioning")
    if manifest.conditioning.kind == "class_labels":
        if manifest.conditioning.num_classes != num_classes or len(inputs) != 1:
            raise ConfigError(
                f"{where} | a class-label model of {manifest.conditioning.num_classes} classes "
                f"with inputs {[spec.name for spec in inputs]} | quality scores digit models "
                f"of {num_classes} classes: fora-export build demo-digits"
            )
        return ClassConditioning(label_input=inputs[0].name)
    path = model_folder / CLASS_CONDITIONING_FILE if model_folder is not None else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"{where} | {manifest.model_class} takes {', '.join(s.name for s in inputs)}, and its model "
            f"'{manifest.source}' has no {CLASS_CONDITIONING_FILE} that maps a digit class to them "
            "| build a digit model: fora-export build demo-digits-flow"
        )
    tables, null_class = load_class_conditioning(path, where)
    names = {spec.name for spec in inputs}
    if set(tables) != names:
        raise ConfigError(
            f"{where} | {path} has tables {sorted(tables)}, the engines' conditioning inputs are "
            f"{sorted(names)} | rebuild from the model the table was trained with"
        )
    fed = {
        spec.name: _check_table(spec, tables[spec.name], num_classes, null_class, path, where)
        for spec in inputs
    }
    return ClassConditioning(tables=fed, source=f"class tables {path.name} ({', '.join(sorted(fed))})")


def _check_table(
    spec: InputSpec, table: np.ndarray, num_classes: int, null_class: int, path: Path, where: str
) -> np.ndarray:
    per_sample = tuple(spec.shape[1:])
    if tuple(table.shape[1:]) != per_sample or table.shape[0] <= max(num_classes - 1, null_class):
        fix = (
            f"rebuild with --text-length {table.shape[1]}"
            if spec.name == "encoder_hidden_states" and table.ndim == 3 and table.shape[2:] == per_sample[1:]
            else "rebuild from the model the table was trained with"
        )
        raise ConfigError(
            f"{where} | table '{spec.name}' in {path} is {list(table.shape)}, the engines take "
            f"[batch, {', '.join(map(str, per_sample))}] for {num_classes} classes and the null class "
            f"{null_class} | {fix}"
        )
    return table.astype(numpy_dtype(spec.dtype))
