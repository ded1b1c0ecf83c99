"""Pooled text embeddings from a pretrained text encoder (CLIP or T5, through transformers).

`embed_captions` (`ddm-node embed-text`) embeds a captions file, one caption per sample, into a dataset directory
(text.npy + text.json, data/text.py); `embed_prompts` embeds `sample --prompt` text with the encoder a plan names,
after checking that its files hash to what the plan recorded. The pooled embedding of a caption is CLIP's
projected text embedding (CLIPModel, CLIPTextModelWithProjection), CLIP's pooled end-of-text token
(CLIPTextModel), or for T5 (T5EncoderModel) the mean of the encoder's last hidden states over the caption's
tokens. Captions are padded and truncated to the encoder's token length (at most 77 for CLIP).

The encoder is a local `save_pretrained` directory holding the model and its tokenizer, or a hub id that
huggingface_hub fetches (or finds in its cache; HF_HUB_OFFLINE=1 forbids a download). transformers is the
optional `[features]` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm_node.core.config import TextConfig
from ddm_node.core.errors import DDMError
from ddm_node.data.text import INFO_FILE, TextInfo, encoder_sha256, load_text, read_captions, write_text

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ddm-node[features]' (transformers)"
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # what a hub encoder needs: config, weights, tokenizer
CLIP_TYPES = ("clip", "clip_text_model")
T5_TYPES = ("t5", "mt5", "umt5")
MAX_TOKENS = 512


@dataclass
class TextEncoder:
    """A loaded text encoder: its name as given, its files' sha256, model, tokenizer and token length."""

    name: str
    sha256: str
    model: object
    tokenizer: object
    model_type: str
    max_length: int


def resolve_encoder(name: str) -> Path:
    """The local directory of encoder `name`: the directory itself, or a hub id's snapshot."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if name.startswith(("/", ".", "~")) or not name:
        raise DDMError(f"text encoder {name!r}: no such directory (a save_pretrained directory or a hub id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except ImportError:
        raise DDMError(f"text encoder {name!r} is not a directory and huggingface_hub is missing: {INSTALL_HINT}") \
            from None
    except Exception as exc:  # offline, unknown repo, network: one line
        raise DDMError(f"text encoder {name!r}: not a directory and not fetchable from the hub "
                       f"({_first_line(exc)})") from None


def load_text_encoder(name: str, device: str = "cpu", expected_sha256: str | None = None) -> TextEncoder:
    """Load encoder `name` and its tokenizer; with `expected_sha256`, its files must hash to it (the plan's)."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise DDMError(f"text embeddings need the transformers library: {INSTALL_HINT}") from None
    directory = resolve_encoder(name)
    digest = encoder_sha256(directory)
    if expected_sha256 is not None and digest != expected_sha256:
        raise DDMError(f"text encoder {name!r} has files sha256 {digest[:16]}.., but the run's embeddings came from "
                       f"an encoder with {expected_sha256[:16]}.. (the one named in the plan's text config)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        model = _model_class(transformers, config).from_pretrained(directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DDMError(f"cannot load text encoder {name!r}: {_first_line(exc)}") from None
    text_config = getattr(config, "text_config", None) or config
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    length = min(int(positions or 77), MAX_TOKENS, int(getattr(tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS))
    model.eval().to(device)
    return TextEncoder(name, digest, model, tokenizer, config.model_type, length)


def _model_class(transformers, config) -> type:
    """The transformers class that embeds text for this config (CLIP or T5); DDMError for anything else."""
    kind = config.model_type
    if kind == "clip":
        return transformers.CLIPModel
    if kind == "clip_text_model":
        arch = (getattr(config, "architectures", None) or ["CLIPTextModel"])[0]
        return transformers.CLIPTextModelWithProjection if arch.endswith("WithProjection") else transformers.CLIPTextModel
    if kind in T5_TYPES:
        return transformers.T5EncoderModel
    raise DDMError(f"text encoder model_type {kind!r} is not supported (CLIP: {', '.join(CLIP_TYPES)}; "
                   f"T5: {', '.join(T5_TYPES)})")


def embed_texts(encoder: TextEncoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """float32 [len(texts), D] pooled embeddings, in order."""
    import torch

    model = encoder.model
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = encoder.tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                                   max_length=encoder.max_length, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        with torch.inference_mode():
            if encoder.model_type == "clip":
                pooled = model.get_text_features(input_ids=ids, attention_mask=mask)
            else:
                pooled = model(input_ids=ids, attention_mask=mask)
        out.append(_pool(pooled, mask).float().cpu().numpy())
    emb = np.concatenate(out).astype(np.float32)
    if not np.isfinite(emb).all():
        raise DDMError(f"text encoder {encoder.name!r} gave NaN or infinite embeddings")
    return emb


def _pool(out, mask):
    """The pooled vector of a model output: a tensor as is, else projected, pooled, or masked-mean hidden states."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for key in ("text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)


def embed_captions(encoder_name: str, captions: str | Path, out_dir: str | Path, batch_size: int = 64,
                   device: str = "cpu", on_batch: Callable[[int], None] | None = None) -> TextInfo:
    """Embed a captions file (one line per sample) into `out_dir`'s text.npy and text.json. When `out_dir` already
    holds a dataset (x.npy), there must be one caption per sample."""
    lines, captions_sha = read_captions(captions)
    out = Path(out_dir)
    _check_count(out, len(lines), Path(captions))
    encoder = load_text_encoder(encoder_name, device=device)
    blocks = []
    for start in range(0, len(lines), batch_size):
        blocks.append(embed_texts(encoder, lines[start:start + batch_size], batch_size))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(lines)))
    emb = np.concatenate(blocks)
    info = TextInfo(encoder=encoder_name, sha256=encoder.sha256, captions_sha256=captions_sha,
                    max_length=encoder.max_length, dim=int(emb.shape[1]), count=len(lines))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out, emb, info)
    load_text(out, len(lines))  # what a loader will see
    log.info("%d x %d text embeddings (%s) written to %s", len(lines), emb.shape[1], encoder.model_type, out)
    return info


def _check_count(out: Path, n: int, captions: Path) -> None:
    x = out / "x.npy"
    if not x.is_file():
        return
    try:
        rows = np.load(x, mmap_mode="r", allow_pickle=False).shape[0]
    except (OSError, ValueError, EOFError, IndexError) as exc:
        raise DDMError(f"{x}: not a readable .npy array ({exc})") from None
    if rows != n:
        raise DDMError(f"{captions}: {n} captions for {rows} samples in {x} (one caption per sample, in order)")


def embed_prompts(text: TextConfig, prompts: list[str], text_dim: int, device: str = "cpu") -> np.ndarray:
    """float32 [len(prompts), text_dim] embeddings of prompts with the encoder the plan's text config names."""
    if not text.encoder:
        raise DDMError("this run is not text-conditioned: its plan names no text encoder (model.text_dim 0)")
    if not prompts:
        raise DDMError("no prompts given")
    encoder = load_text_encoder(text.encoder, device=device, expected_sha256=text.sha256)
    emb = embed_texts(encoder, list(prompts))
    if emb.shape[1] != text_dim:
        raise DDMError(f"text encoder {text.encoder!r} gives {emb.shape[1]}-wide embeddings, the plan's model "
                       f"takes model.text_dim {text_dim} (see the dataset's {INFO_FILE})")
    return emb


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
