"""Random-number flows for exactly reproducible (and exactly resumable) training.

Every random draw in training comes from a generator seeded by
``derive_seed(seed, purpose, step, ...)``: the draws of optimizer step N are
the same whether the run started at step 0 or resumed at step K < N, and
whatever order DataLoader workers fetched in. The global generators (python,
numpy, torch) are also saved in checkpoints and restored on resume, so code
that draws from them outside the training step (none of ours) stays in step.
"""

import random
from enum import IntEnum

import numpy as np
import sentencepiece
import torch


class Purpose(IntEnum):
    """Separates the random streams of one step from one another."""

    DROPOUT = 1  # global torch generator during forward/backward
    FEATURES = 2  # dither and SpecAugment
    ITEM = 3  # speed perturbation and subword sampling of one utterance
    GRAD_NOISE = 4


def derive_seed(*words: int) -> int:
    """A 63-bit seed that depends only on ``words`` (e.g. seed, purpose, step, rank)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0]) >> 1


def seed_item_rngs(seed: int) -> np.random.Generator:
    """Seed the generators that per-utterance code draws from; return a numpy one for it.

    The tokenizer's subword sampling uses python's ``random`` and
    SentencePiece's own generator; both are reseeded here, in whichever
    process (main or DataLoader worker) loads the utterance.
    """
    random.seed(seed)
    sentencepiece.set_random_generator_seed(seed & 0xFFFFFFFF)
    return np.random.default_rng(seed)


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def get_rng_state() -> dict:
    """The global generators' states as plain types and tensors (``weights_only`` safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``get_rng_state`` returned (CUDA states only when CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["algorithm"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
