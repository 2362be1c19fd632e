"""AnyStoryTextEncode: CLIPTextEncode that also records where each subject's label words sit in the
prompt's tokens, for the training-free attention router (router_mode "attention"/"mixed"/"auto"
without a learned router). The CONDITIONING is ComfyUI's own encoding of the text (weighting syntax,
prompts longer than 77 tokens, embeddings all work); the token positions travel in its dict as
``anystory_labels`` = {label: [positions in the context]}."""
from __future__ import annotations

import logging

from ..anystory.attention_router import STOP_WORDS, find_label_positions
from .types import ANYSTORY_SUBJECTS, AnyStoryError, SubjectList

log = logging.getLogger("anystory")

LABELS_KEY = "anystory_labels"


def _sub_tokenizer(clip):
    tok = clip.tokenizer
    for name in ("clip_l", "clip_g"):
        sub = getattr(tok, name, None)
        if sub is not None and hasattr(sub, "tokenizer"):
            return name[-1], sub
    if hasattr(tok, "tokenizer"):
        return None, tok
    raise AnyStoryError("this CLIP has no CLIP tokenizer; AnyStory's attention router needs an SDXL CLIP")


def _ids(sub, text: str) -> list:
    ids = sub.tokenizer(text)["input_ids"]
    start = getattr(sub, "tokens_start", 1)
    end = -1 if getattr(sub, "tokenizer_adds_end_token", True) else None
    return [int(t) for t in ids[start:end]]


def label_positions(clip, text: str, labels: list) -> dict:
    """{label: positions} of every label in ``text`` (as ComfyUI tokenizes it for this CLIP); raises
    AnyStoryError naming the labels that are not in the prompt."""
    tokens = clip.tokenize(text)
    key, sub = _sub_tokenizer(clip)
    chunks_w = tokens[key] if isinstance(tokens, dict) and key in tokens else next(iter(tokens.values()))
    chunks = [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in chunks_w]
    chunk_len = len(chunks_w[0]) if chunks_w else 77
    stop = {i for w in STOP_WORDS for i in _ids(sub, w)}
    out, missing = {}, []
    for lab in labels:
        lab = (lab or "").strip()
        if not lab:
            continue
        pos = find_label_positions(chunks, _ids(sub, lab), chunk_len, stop)
        if not pos:  # try each word of a multi-word label on its own ("red car" in "a car, red")
            words = [w for w in lab.split() if w.lower() not in STOP_WORDS]
            pos = sorted({p for w in words for p in find_label_positions(chunks, _ids(sub, w), chunk_len, stop)})
        if pos:
            out[lab] = pos
        else:
            missing.append(lab)
    if missing:
        raise AnyStoryError(
            f"the subject label(s) {', '.join(repr(m) for m in missing)} do not occur in the prompt {text[:120]!r}. "
            "The attention router finds each subject by its words in the prompt: write them into the prompt "
            "(e.g. 'the fox and the robot …') or change the label on AnyStorySubjectEncode.")
    return out


class AnyStoryTextEncode:
    CATEGORY = "AnyStory"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt's conditioning (as CLIPTextEncode makes it) with the positions of each "
                       "subject's words, for AnyStory's attention router.",)
    DESCRIPTION = ("Encodes the positive prompt like CLIPTextEncode and marks where each subject's label words "
                   "are, so AnyStory can route subjects without a trained router (public weights).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The SDXL CLIP (text encoders) of your checkpoint."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip":
                                    "The positive prompt. Must contain each subject's label words "
                                    "(e.g. 'the fox', 'the robot'). Weighting syntax and long prompts work."}),
                "subjects": (ANYSTORY_SUBJECTS, {"tooltip": "The subjects whose labels are looked up in the prompt."}),
            },
        }

    def encode(self, clip, text, subjects):
        if clip is None:
            raise AnyStoryError("no CLIP connected: the checkpoint may have no text encoders")
        if not isinstance(subjects, SubjectList):
            raise AnyStoryError("the 'subjects' input must come from AnyStorySubjectEncode")
        if getattr(subjects, "family", "SDXL") != "SDXL":  # FLUX: the learned router needs no label positions
            log.warning("AnyStory: AnyStory Text Encode is not needed with %s subjects (its router needs no label "
                        "words); the prompt is encoded as CLIPTextEncode does", subjects.family)
            return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)
        labels = [s.label for s in subjects.subjects]
        if not any(labels):
            raise AnyStoryError("no subject has a label: set 'label' on each AnyStorySubjectEncode to the words that "
                                "name it in the prompt")
        positions = label_positions(clip, text, labels)
        tokens = clip.tokenize(text)
        cond = clip.encode_from_tokens_scheduled(tokens)
        out = []
        for c in cond:
            d = dict(c[1])
            d[LABELS_KEY] = positions
            out.append([c[0], d])
        log.info("AnyStory: label positions in the prompt: %s", positions)
        return (out,)
