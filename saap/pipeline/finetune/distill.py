"""Distillation from the dense parent: the teacher of ``saap finetune --teacher``.

A pruned model's own dense parent is the best teacher it can have: it was trained on the data the
student forgot, and it shares the student's tokenizer and vocabulary. Matching its next-token
distribution on any plain text (Minitron, Muralidharan et al. 2024) needs no instruction data and
gives the student a full distribution per token instead of one label, which is why it recovers
more per step than the language-model loss on the same text.

``--teacher parent`` follows the ``source`` that ``saap prune`` (and ``saap finetune``) record in
``saap.json`` back to the dense model, and checks that its weights are the ones that were pruned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saap.runtime.checkpoint import METADATA_FILE, is_checkpoint
from saap.runtime.errors import SaapError

PARENT = "parent"  # --teacher value: the dense model recorded in saap.json
DERIVED_KINDS = ("pruned", "finetuned")  # checkpoints whose source is one step closer to the dense model


def _loadable(source: dict[str, Any]) -> str | None:
    """The first of a recorded source's name and path that still names a model here."""
    from saap.runtime.models import ALIASES

    for spec in (source.get("name"), source.get("path")):
        if spec and (spec in ALIASES or Path(spec).expanduser().exists()):
            return spec
    return None


def parent_source(metadata: dict[str, Any] | None, model: str) -> dict[str, Any]:
    """The recorded source of the dense model that ``model`` (a saap checkpoint) was derived from,
    following finetuned -> pruned -> dense; its ``spec`` key is what ``load_model`` takes."""
    source = (metadata or {}).get("source")
    seen: set[str] = set()
    while True:
        if not source:
            raise SaapError(
                f"--teacher {PARENT}: '{model}' records no source model in its {METADATA_FILE}; "
                "pass --teacher with the dense model"
            )
        spec = _loadable(source)
        if spec is None:
            raise SaapError(
                f"--teacher {PARENT}: the dense model '{source.get('name')}' recorded by '{model}' "
                "is not here any more; pass --teacher with its new path"
            )
        path = Path(spec).expanduser()
        if not (path.is_dir() and is_checkpoint(path)) or str(path.resolve()) in seen:
            return source | {"spec": spec}
        seen.add(str(path.resolve()))
        recorded = json.loads((path / METADATA_FILE).read_text())
        if recorded.get("kind") not in DERIVED_KINDS:
            return source | {"spec": spec}
        source = recorded.get("source")


def load_teacher(teacher: str, metadata: dict[str, Any] | None, model: str, student: torch.nn.Module):
    """(frozen teacher model, record for saap.json). ``teacher`` is ``parent`` or a model spec."""
    from saap.runtime.models import load_model

    recorded = parent_source(metadata, model) if teacher == PARENT else None
    loaded = load_model(recorded["spec"] if recorded else teacher)
    if recorded and recorded.get("sha256") and loaded.source.get("sha256") not in (None, recorded["sha256"]):
        raise SaapError(
            f"--teacher {PARENT}: '{recorded['spec']}' is not the model '{model}' was pruned from "
            "(its sha256 differs from the one recorded); pass --teacher explicitly"
        )
    if loaded.model.config.vocab_size != student.config.vocab_size:
        raise SaapError(
            f"--teacher '{teacher}' has a vocabulary of {loaded.model.config.vocab_size} tokens, "
            f"the student {student.config.vocab_size}: distillation needs the same tokenizer"
        )
    loaded.model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    if recorded:
        _share_embeddings(loaded.model, student)
    params = sum(p.numel() for p in loaded.model.parameters())
    return loaded.model, {"spec": teacher, "source": loaded.source, "params": params}


def _share_embeddings(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """Point the teacher's embedding (and a head tied to it) at the student's tensor.

    Pruning never changes the embedding and no recovery method trains it, so a parent's and its
    student's are the same 28 M values at SmolLM2's size (113 MB). The teacher's weights are
    memory-mapped, so its own copy is never read, and never resident, once it is replaced before
    the first forward. A few sampled rows guard against a parent that is not what the student was
    pruned from after all."""
    mine, theirs = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    rows = torch.linspace(0, mine.shape[0] - 1, 8).long()
    if mine.shape != theirs.shape or not torch.equal(mine[rows], theirs[rows]):
        return
    tied_head = teacher.get_output_embeddings().weight is theirs
    teacher.get_input_embeddings().weight = mine
    if tied_head:
        teacher.get_output_embeddings().weight = mine


class Distiller:
    """The training loss against a teacher on the same batch.

    loss = kl_weight * T^2 * KL(teacher_T || student_T) + (1 - kl_weight) * cross-entropy,
    both averaged over the batch's labelled next-token positions. T^2 keeps the gradient's scale
    independent of the temperature (Hinton et al. 2015). The teacher's logits are computed on the
    fly: at this size a teacher forward costs about a third of a student step, and a top-k cache
    of the whole training text would cost more disk than it saves time.
    """

    def __init__(self, teacher: torch.nn.Module, temperature: float, kl_weight: float, ignore_index: int):
        self.teacher, self.temperature, self.kl_weight = teacher, temperature, kl_weight
        self.ignore_index = ignore_index

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = inputs["labels"][:, 1:]
        keep = labels != self.ignore_index
        student = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
        t = self.temperature
        log_student, log_teacher = F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        loss = self.kl_weight * t * t * kl
        if self.kl_weight < 1:
            loss = loss + (1 - self.kl_weight) * F.cross_entropy(student, labels[keep])
        return loss
