"""Images skipped or upscaled: a note with each item that replaces one, added up for the run.

An image that cannot be used as it is (unreadable, too small) is skipped or
upscaled, and the item that takes its place carries a note saying so
(`image_notes`), so that the training process learns of it even when the image
was decoded in a DataLoader worker or on another accelerate process; the run's
`ImageReport` adds the notes up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from ..errors import DatasetUnavailableError
from .preprocessing import ImagePreprocessor, UNREADABLE_IMAGE_ERRORS

logger = logging.getLogger(__name__)


SKIPPED, UPSCALED = "skipped", "upscaled"
# A note: (SKIPPED or UPSCALED, the file or record — None when the source names none —, why).
Note = tuple[str, "str | None", str]

# Notes travel with each item as a fixed-size byte tensor holding JSON: accelerate can then
# move, split and concatenate them like the pixels (it dispatches streamed batches from the
# main process and accepts tensors only), and DataLoader workers hand them back like any item.
NOTE_BYTES = 512
MAX_NOTE_FIELD = 160  # characters kept of a path (its end) and of a reason (its start)
NO_NOTES = torch.zeros(NOTE_BYTES, dtype=torch.uint8)
REPORTED_EXAMPLES = 5  # files (with reasons) named per kind at the end of a run and in its summary
PENDING_BATCHES = 64  # batches whose notes are read from the device at once


def describe_image_source(source: Any) -> str:
    return image_source_name(source) or "<in-memory image>"


def image_source_name(source: Any) -> str | None:
    """The file (or LMDB record) an image came from, when its source says."""
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return None


def encode_notes(notes: list[Note]) -> torch.Tensor:
    """uint8 (NOTE_BYTES,): the counts per kind exactly, and as many notes as fit."""
    if not notes:
        return NO_NOTES
    counts = {kind: sum(note[0] == kind for note in notes) for kind in (SKIPPED, UPSCALED)}
    shortened = [(kind, where if where is None else where[-MAX_NOTE_FIELD:], reason[:MAX_NOTE_FIELD])
                 for kind, where, reason in notes]
    for kept in range(len(shortened), -1, -1):
        encoded = json.dumps({"counts": counts, "notes": shortened[:kept]}, ensure_ascii=False).encode()
        if len(encoded) <= NOTE_BYTES:
            break
    return torch.frombuffer(bytearray(encoded.ljust(NOTE_BYTES, b"\0")), dtype=torch.uint8)


def decode_notes(encoded: torch.Tensor) -> tuple[dict[str, int], list[Note]]:
    """The counts per kind and the notes that `encode_notes` kept."""
    text = bytes(encoded.cpu().numpy()).rstrip(b"\0")
    if not text:
        return {}, []
    payload = json.loads(text)
    return payload["counts"], [tuple(note) for note in payload["notes"]]


@dataclass
class ImageReport:
    """The images of a run that were skipped or upscaled: each named file counted once
    (it comes back every epoch), notes without a name counted each time."""

    files: dict[str, dict[str, str]] = field(default_factory=lambda: {SKIPPED: {}, UPSCALED: {}})
    unnamed: dict[str, int] = field(default_factory=lambda: {SKIPPED: 0, UPSCALED: 0})
    unnamed_reasons: dict[str, list[str]] = field(default_factory=lambda: {SKIPPED: [], UPSCALED: []})
    pending: list[torch.Tensor] = field(default_factory=list)  # batches' notes not read yet (maybe on the GPU)

    def add_batch(self, batch: dict) -> None:
        """Take the notes of a collated batch (`batch["image_notes"]`, (B, NOTE_BYTES))."""
        notes = batch.get("image_notes")
        if notes is None:
            return
        # On the GPU, reading them now would wait for it at every micro-batch: they are read in bulk.
        self.pending.append(notes)
        if len(self.pending) == PENDING_BATCHES:
            self.collect()

    def collect(self) -> "ImageReport":
        """Read the notes still pending; return the report (now ready for `gather_object`)."""
        if self.pending:
            notes = torch.cat(self.pending).cpu()
            self.pending = []
            for row in notes[(notes != 0).any(dim=1)]:
                self.add(*decode_notes(row))
        return self

    def add(self, counts: dict[str, int], notes: list[Note]) -> None:
        for kind, where, reason in notes:
            if where is None:
                self._add_unnamed(kind, 1, reason)
            else:
                self.files[kind].setdefault(where, reason)
        for kind, count in counts.items():  # notes that did not fit in the tensor
            self._add_unnamed(kind, count - sum(note[0] == kind for note in notes), None)

    def _add_unnamed(self, kind: str, count: int, reason: str | None) -> None:
        self.unnamed[kind] += count
        if count and reason is not None and len(self.unnamed_reasons[kind]) < REPORTED_EXAMPLES:
            self.unnamed_reasons[kind].append(reason)

    def merge(self, other: "ImageReport") -> None:
        for kind in (SKIPPED, UPSCALED):
            for where, reason in other.files[kind].items():
                self.files[kind].setdefault(where, reason)
            self._add_unnamed(kind, other.unnamed[kind], None)
            self.unnamed_reasons[kind].extend(other.unnamed_reasons[kind])
            del self.unnamed_reasons[kind][REPORTED_EXAMPLES:]

    def count(self, kind: str) -> int:
        self.collect()
        return len(self.files[kind]) + self.unnamed[kind]

    def examples(self, kind: str) -> list[str]:
        """The first few "file: reason" lines of a kind."""
        self.collect()
        named = [f"{where}: {reason}" for where, reason in self.files[kind].items()]
        return (named + self.unnamed_reasons[kind])[:REPORTED_EXAMPLES]


def summarise_image_reports(reports: list[ImageReport]) -> tuple[dict[str, Any], list[str]]:
    """All processes' reports (`gather_object`) as the run summary's fields and the end-of-run lines."""
    total = ImageReport()
    for report in reports:
        total.merge(report.collect())
    summary = {"images_skipped": total.count(SKIPPED), "images_upscaled": total.count(UPSCALED),
               "images_skipped_examples": total.examples(SKIPPED),
               "images_upscaled_examples": total.examples(UPSCALED)}
    lines = []
    for kind, advice in ((SKIPPED, ""), (UPSCALED, " (--min_image_size skips such images instead)")):
        count = total.count(kind)
        if count:
            lines.append(f"{count} image{'s' if count != 1 else ''} {kind}{advice}; the first:")
            lines.extend(f"  {example}" for example in total.examples(kind))
    return summary, lines


# How many notes of each kind a process logs as they happen; the rest are only counted.
LOGGED_NOTES = 10
_logged = {SKIPPED: 0, UPSCALED: 0}


def log_note(kind: str, source: Any, reason: str) -> Note:
    """Warn about an image skipped or upscaled (the first few of each kind); return its note."""
    _logged[kind] += 1
    if _logged[kind] <= LOGGED_NOTES:
        logger.warning("%s image %s (%s)%s", kind, describe_image_source(source), reason,
                       "; further ones are only counted" if _logged[kind] == LOGGED_NOTES else "")
    return (kind, image_source_name(source), reason)


def describe_error(error: Exception) -> str:
    """Why an image was skipped, without PIL's "<_io.BytesIO object at 0x...>" (noise in a report)."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image file PIL can identify"
    return str(error) or type(error).__name__


def noting_skips(notes: list[Note], source: Any, resolution: int, make: Callable[[], Any]) -> Any | None:
    """`make()` (a preprocessing stage of `source`), or None when the image must be skipped;
    a skip or an upscale is added to `notes`."""
    try:
        result = make()
    except UNREADABLE_IMAGE_ERRORS as error:
        notes.append(log_note(SKIPPED, source, describe_error(error)))
        return None
    if result.upscaled:
        width, height = result.original_size
        notes.append(log_note(UPSCALED, source, f"{width}x{height} upscaled to {resolution} px"))
    return result


def prepare_or_note(preprocess: ImagePreprocessor, source: Any, generator: torch.Generator | None,
                    notes: list[Note]) -> torch.Tensor | None:
    """The image's uint8 pixels, or None when it must be skipped; a skip or an upscale is added to `notes`."""
    prepared = noting_skips(notes, source, preprocess.resolution, lambda: preprocess.prepare(source, generator))
    return None if prepared is None else prepared.pixels


MAX_CONSECUTIVE_UNREADABLE = 100


def too_many_unreadable(where: str, notes: list[Note]) -> DatasetUnavailableError:
    kind, source, reason = notes[-1]
    return DatasetUnavailableError(
        f"{MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row {where} (the last, {source or 'an image'}: "
        f"{reason}): check the data (images below --min_image_size count too)"
    )
