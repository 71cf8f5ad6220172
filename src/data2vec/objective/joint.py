"""Joint multi-modal data2vec: one shared transformer, a part per modality, one EMA teacher.

Each modality's *part* is an ordinary single-modality model — :class:`~.data2vec.Data2Vec`
(front-end + regression head) or :class:`~.data2vec2.Data2VecV2` (front-end, decoder, ALiBi) —
built around the one shared :class:`~data2vec.nn.transformer.TransformerEncoder`, so its
objective (masking, top-K targets, norms, loss) is exactly the single-modality code. A batch
goes to the part its ``batch.modality`` names; the loop's batches come one modality at a time.

One EMA teacher: :attr:`JointData2Vec.teacher` holds one copy of the shared transformer plus,
per modality, the copies of the front-end pieces that modality's ``ema_scope`` says the teacher
tracks (images 'all': the patch embedding, positions and CLS; v2 speech 'context': the positional
conv and ALiBi scales; 'encoder': nothing — the student's own front-end output feeds the
teacher). Every update moves all of it by the same τ; each part's teacher is a view into it.

The registered modules — hence the state dict — hold every tensor once::

    encoder.*                          the shared transformer (student)
    modalities.<m>.frontend.*          each modality's front-end ...
    modalities.<m>.head.* | decoder.*  ... and head (v1) or decoder and ALiBi scales (v2)
    teacher.model.encoder.*            the teacher's shared transformer
    teacher.model.<m>.*                the teacher's own front-end pieces of modality m

and ``model.view(m).state_dict()`` is modality m's single-modality state dict (``frontend.*``,
``encoder.*``, ``head.*``, ``teacher.model.*``), which is how a joint checkpoint becomes a
speech, image or text model for fine-tuning, extraction and export.

Example::

    model = build_model(load_config("speech,image,text", "tiny"))
    out = model(batch)            # batch.modality = 'image', batch.mask as for images
    out.loss.backward(); opt.step(); model.ema_step(step)
"""

from __future__ import annotations

import itertools

from torch import nn

from data2vec.batch import Batch
from data2vec.errors import DataError
from data2vec.objective.data2vec import Data2VecOutput, StudentTeacher
from data2vec.objective.ema import EMATeacher

SHARED = ("encoder", "teacher")
"""A part's children that the joint model holds once for all modalities."""


def _teacher_pieces(part: StudentTeacher) -> dict[str, nn.Module]:
    """A part's teacher modules besides the transformer (empty when it tracks the encoder only)."""
    model = part.teacher.model
    if not isinstance(model, nn.ModuleDict):
        return {}
    return {name: module for name, module in model.items() if name != "encoder"}


def _tracked_pieces(part: StudentTeacher) -> dict[str, nn.Module]:
    """The student modules that the part's teacher pieces mirror."""
    tracked = part._tracked()
    if not isinstance(tracked, nn.ModuleDict):
        return {}
    return {name: module for name, module in tracked.items() if name != "encoder"}


class JointData2Vec(StudentTeacher):
    """One shared transformer, one part per modality, one EMA teacher (see the module doc)."""

    def __init__(self, parts: dict[str, StudentTeacher], ema_start: float, ema_end: float,
                 ema_anneal_steps: int) -> None:
        super().__init__()
        encoders = {id(part.encoder) for part in parts.values()}
        if len(parts) < 2 or len(encoders) != 1:
            raise ValueError("a joint model needs two or more parts built around one encoder")
        self.encoder = next(iter(parts.values())).encoder
        self.modalities = nn.ModuleDict({
            m: nn.ModuleDict({n: c for n, c in part.named_children() if n not in SHARED})
            for m, part in parts.items()})
        # The teacher: one deep copy of the shared transformer and of each part's own pieces.
        template = nn.ModuleDict({"encoder": self.encoder, **{
            m: nn.ModuleDict(_teacher_pieces(part)) for m, part in parts.items()}})
        self.teacher = EMATeacher(template, ema_start, ema_end, ema_anneal_steps)
        # The single-modality views: a plain dict, so not registered (their modules are, once).
        self.views: dict[str, StudentTeacher] = dict(parts)
        for modality, part in parts.items():
            self._point_teacher(modality, part)
        self._check_every_tensor_held_once()

    def _point_teacher(self, modality: str, part: StudentTeacher) -> None:
        """Make the part's teacher a view into the joint teacher (its own copy is dropped)."""
        shared = self.teacher.model
        if not isinstance(part.teacher.model, nn.ModuleDict):
            part.teacher.model = shared["encoder"]
            return
        for name in list(part.teacher.model.keys()):
            part.teacher.model[name] = (shared["encoder"] if name == "encoder"
                                        else shared[modality][name])

    def _check_every_tensor_held_once(self) -> None:
        own = {id(t) for t in itertools.chain(self.parameters(), self.buffers())}
        for modality, part in self.views.items():
            stray = [n for n, t in itertools.chain(part.named_parameters(), part.named_buffers())
                     if id(t) not in own]
            if stray:
                raise ValueError(f"{modality} part: {stray[:3]} are not held by the joint model")

    def _tracked(self) -> nn.ModuleDict:
        """The student modules the teacher mirrors, under the teacher's names."""
        return nn.ModuleDict({"encoder": self.encoder, **{
            m: nn.ModuleDict(_tracked_pieces(part)) for m, part in self.views.items()}})

    def view(self, modality: str) -> StudentTeacher:
        """Modality `modality`'s single-modality model, sharing this model's weights."""
        if modality not in self.views:
            raise DataError(f"modality {modality!r} is not one of this joint model's "
                            f"({', '.join(self.views)})")
        return self.views[modality]

    def train(self, mode: bool = True) -> JointData2Vec:
        """Train/eval mode for every module, the views' own flags included."""
        super().train(mode)
        for part in self.views.values():
            part.train(mode)
        return self

    def forward(self, batch: Batch) -> Data2VecOutput:
        """The loss of a batch of one modality (``batch.modality``), by that modality's part."""
        if batch.modality is None:
            raise DataError("a joint model needs batch.modality ('speech', 'image' or 'text')")
        return self.view(batch.modality)(batch)


__all__ = ["JointData2Vec"]
