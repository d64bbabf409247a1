"""Time-synchronous adaptive beam search for the transducer, with n-gram shallow fusion (docs/formats.md section 12).

The algorithm is CAIMAN-ASR's. Per encoder frame, the hypotheses carried from
the previous frame (the frame's *inputs*) are expanded best-first: the joint
network gives ``log_softmax(logits / temperature)`` for the hypothesis; blank
puts the hypothesis (score plus the blank's log-probability) into the frame's
*kept* set, each non-blank token that passes the top-k pruning adds a longer
hypothesis to the inputs (at most ``max_symbols_per_step`` tokens per frame).
Hypotheses spelling the same text are merged by log-adding their scores,
keeping the better one's states. The frame ends when ``beam_width`` kept
hypotheses beat the best remaining input (or the inputs run out); the best
``beam_width`` of those go on to the next frame, less any whose
length-normalised score (score / (tokens + 1)) is more than
``prune_score_thresh`` below the best.

Finals: the tokens common to every kept hypothesis are final. When no final
was made for ``final_emission_thresh`` seconds the worst hypotheses (by
length-normalised score) are dropped until one is. The result of an
utterance is its best hypothesis by length-normalised score.

Scores: each token adds its log-probability, plus ``NgramScorer.score``
(``scale_factor * ln P(piece | context)``; user tokens such as ``<EOS>`` are
not scored) and the keyword bonus (``core.keywords``).

Speed: the utterances of a batch advance together. Each step runs one
prediction-network call (only for token sequences never seen before: outputs
are cached per token prefix in a trie shared by the batch) and one joint call
for the input hypotheses of every unfinished utterance that have no joint
output at their frame yet; then each utterance expands, best first, every
hypothesis it can until its frame ends or its best input is one made in this
step. The order of expansions is exactly that of expanding one hypothesis at
a time. Utterances may be spread over forked CPU processes (``procs``).
"""

import math
import multiprocessing
from dataclasses import dataclass
from typing import Optional, Sequence

import sentencepiece
import torch
from torch import Tensor

from caiman_asr_train.core.keywords import Keywords, KeywordState
from caiman_asr_train.core.model import RNNT
from caiman_asr_train.core.ngram_scorer import NgramScorer

WORD_BOUNDARY = "\u2581"


@dataclass(frozen=True)
class BeamOptions:
    """Settings of the beam search (CAIMAN-ASR's flag names and defaults).

    Attributes:
        beam_width: hypotheses carried from frame to frame (>= 1).
        temperature: logits are divided by it before the log-softmax (> 0).
        prune_topk_thresh: tokens whose log-probability is more than this
            below the frame's best token are not expanded; < 0 disables.
        prune_score_thresh: hypotheses whose length-normalised score is more
            than this below the best are dropped; < 0 disables.
        final_emission_thresh: seconds without a final after which the worst
            hypotheses are dropped until one is made; < 0 disables.
        max_symbols_per_step: most tokens a hypothesis may emit per frame.
    """

    beam_width: int = 4
    temperature: float = 1.4
    prune_topk_thresh: float = 1.5
    prune_score_thresh: float = 0.4
    final_emission_thresh: float = 1.25
    max_symbols_per_step: int = 8

    def __post_init__(self):
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_symbols_per_step < 1:
            raise ValueError(f"max_symbols_per_step must be >= 1, got {self.max_symbols_per_step}")


class _PrefixStore:
    """Prediction-network outputs per token prefix: a trie whose nodes hold ``joint_pred(g)`` and the LSTM state.

    Node 0 is the start (after the prefix tokens, if any). Tensors:
    ``g[capacity, joint_n_hid]``, ``h`` and ``c`` ``[pred_rnn_layers, capacity, pred_n_hid]``.
    """

    def __init__(self, model: RNNT, pieces: Sequence[str], prefix_tokens: Sequence[int]):
        self.model = model
        self.pieces = pieces
        device = model.joint_pred.weight.device
        if prefix_tokens:
            g, (h, c) = model.predict(torch.tensor([list(prefix_tokens)], device=device), add_sos=True)
            g = g[:, -1]
        else:
            g, (h, c) = model.predict(None)
            g = g[:, 0]
        self.g = model.joint_pred(g)
        self.h, self.c = h, c
        self.parent = [-1]
        self.token = [-1]
        self.depth = [0]
        # What each node spells, the merge key; a sentence starts at a word boundary.
        self.text = [WORD_BOUNDARY]
        self.size = 1
        self.ready = [True]
        self.children: dict[tuple[int, int], int] = {}

    def child(self, parent: int, token: int) -> int:
        """The node of ``parent``'s tokens followed by ``token`` (created, not computed, if new)."""
        node = self.children.get((parent, token))
        if node is None:
            node = len(self.parent)
            self.children[(parent, token)] = node
            self.parent.append(parent)
            self.token.append(token)
            self.depth.append(self.depth[parent] + 1)
            text, piece = self.text[parent], self.pieces[token]
            # "▁" after a word boundary adds nothing: such hypotheses spell the same text.
            if piece.startswith(WORD_BOUNDARY) and text.endswith(WORD_BOUNDARY):
                piece = piece[1:]
            self.text.append(text + piece)
            self.ready.append(False)
        return node

    def compute(self, nodes: list[int]) -> None:
        """Run the prediction network once for every node of ``nodes`` not yet computed."""
        todo = [n for n in dict.fromkeys(nodes) if not self.ready[n]]
        if not todo:
            return
        if len(self.parent) > self.g.shape[0]:
            grow = max(len(self.parent), 2 * self.g.shape[0]) - self.g.shape[0]
            self.g = torch.cat([self.g, self.g.new_empty(grow, self.g.shape[1])])
            self.h = torch.cat([self.h, self.h.new_empty(self.h.shape[0], grow, self.h.shape[2])], dim=1)
            self.c = torch.cat([self.c, self.c.new_empty(self.c.shape[0], grow, self.c.shape[2])], dim=1)
        device = self.g.device
        rows = torch.tensor(todo, device=device)
        parents = torch.tensor([self.parent[n] for n in todo], device=device)
        tokens = torch.tensor([[self.token[n]] for n in todo], device=device)
        g, (h, c) = self.model.predict(tokens, (self.h[:, parents], self.c[:, parents]), add_sos=False)
        self.g[rows] = self.model.joint_pred(g[:, 0])
        self.h[:, rows] = h
        self.c[:, rows] = c
        for n in todo:
            self.ready[n] = True

    def tokens(self, node: int) -> list[int]:
        out = []
        while node > 0:
            out.append(self.token[node])
            node = self.parent[node]
        return out[::-1]

    def common_ancestor_depth(self, nodes: list[int]) -> int:
        """Depth of the deepest node that is an ancestor (or self) of every node: the final tokens."""
        nodes = set(nodes)
        while len(nodes) > 1:
            deepest = max(nodes, key=self.depth.__getitem__)
            nodes.discard(deepest)
            nodes.add(self.parent[deepest])
        return self.depth[nodes.pop()]


class _Hyp:
    __slots__ = ("score", "node", "length", "symbols", "lm_state", "kw_state")

    def __init__(self, score: float, node: int, length: int, symbols: int, lm_state, kw_state: KeywordState):
        self.score = score
        self.node = node
        self.length = length
        self.symbols = symbols
        self.lm_state = lm_state
        self.kw_state = kw_state

    @property
    def normalised(self) -> float:
        return self.score / (self.length + 1)


def _log_add(a: float, b: float) -> float:
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _merge(into: dict[str, _Hyp], key: str, hyp: _Hyp) -> None:
    """Add ``hyp`` under ``key``; an existing hypothesis there is merged (log-add, better one's states)."""
    old = into.get(key)
    if old is None:
        into[key] = hyp
        return
    total = _log_add(old.score, hyp.score)
    if hyp.score > old.score:
        into[key] = hyp
    into[key].score = total


class _Utterance:
    __slots__ = ("index", "frames", "t", "inputs", "kept", "rows", "final_depth", "last_final", "result")

    def __init__(self, index: int, frames: int, root: _Hyp, root_text: str):
        self.index = index
        self.frames = frames
        self.t = 0
        self.inputs: dict[str, _Hyp] = {root_text: root}
        self.kept: dict[str, _Hyp] = {}
        # node -> joint output at frame t: [blank log-prob, top-k log-probs, top-k ids]
        self.rows: dict[int, list[float]] = {}
        self.final_depth = 0
        self.last_final = 0
        self.result: Optional[int] = None if frames > 0 else 0


class BeamSearch:
    """Beam search decoder over a core ``RNNT``.

    Args:
        model: the transducer, in eval mode.
        pieces: SentencePiece piece string of every token id (not the blank).
        options: search settings.
        ngram: shallow-fusion n-gram, or None.
        keywords: keyword boosting, or None.
        user_tokens: token ids the n-gram does not score (e.g. ``<EOS>``).
        frame_seconds: duration of one encoder frame (needed for
            ``final_emission_thresh``; None disables forced finals).
        prefix_tokens: token ids the prediction network consumes before
            decoding (a ``prefix_token_map`` entry), not part of the output.
        procs: CPU processes the utterances of a batch are spread over.
    """

    def __init__(
        self,
        model: RNNT,
        pieces: Sequence[str],
        options: BeamOptions = BeamOptions(),
        ngram: Optional[NgramScorer] = None,
        keywords: Optional[Keywords] = None,
        user_tokens: Sequence[int] = (),
        frame_seconds: Optional[float] = None,
        prefix_tokens: Sequence[int] = (),
        procs: int = 1,
    ):
        if len(pieces) != model.config.n_classes - 1:
            raise ValueError(
                f"{len(pieces)} pieces for a model with {model.config.n_classes - 1} token classes"
            )
        if procs < 1:
            raise ValueError(f"procs must be >= 1, got {procs}")
        self.model = model
        self.pieces = list(pieces)
        self.options = options
        self.ngram = ngram
        self.keywords = keywords
        self.user_tokens = frozenset(user_tokens)
        self.frame_seconds = frame_seconds
        self.prefix_tokens = list(prefix_tokens)
        self.procs = procs

    @torch.no_grad()
    def __call__(self, x: Tensor, x_lens: Tensor) -> list[list[int]]:
        """x[T, B, in_feats] spliced features, x_lens[B] frames -> one list of token ids per utterance."""
        f, f_lens, _ = self.model.encode(x, x_lens)
        return self.decode_encoded(f, f_lens)

    @torch.no_grad()
    def decode_encoded(self, f: Tensor, f_lens: Tensor) -> list[list[int]]:
        """Search over encoder output f[B, T', enc_n_hid] with f_lens[B] frames -> token ids per utterance."""
        batch = f.shape[0]
        procs = min(self.procs, batch)
        if procs <= 1:
            return self._search(f, f_lens)
        chunks = [c.tolist() for c in torch.arange(batch).tensor_split(procs)]
        global _WORKER_SEARCH
        _WORKER_SEARCH = self
        try:
            # Forked workers inherit the model and n-gram as they are now (no pickling, no stale weights).
            with multiprocessing.get_context("fork").Pool(procs, initializer=_init_worker) as pool:
                parts = pool.map(_worker_search, [(f[c], f_lens[c]) for c in chunks])
        finally:
            _WORKER_SEARCH = None
        return [ids for part in parts for ids in part]

    def _search(self, f: Tensor, f_lens: Tensor) -> list[list[int]]:
        opts = self.options
        model = self.model
        store = _PrefixStore(model, self.pieces, self.prefix_tokens)
        enc = model.joint_enc(f)
        blank = model.config.blank_idx
        k = min(opts.beam_width, model.config.n_classes)
        topk_thresh = opts.prune_topk_thresh if opts.prune_topk_thresh >= 0 else math.inf
        lm_begin = self.ngram.begin_state() if self.ngram is not None else None
        kw_begin = Keywords.begin_state()
        utts = [
            _Utterance(b, int(n), _Hyp(0.0, 0, 0, 0, lm_begin, kw_begin), store.text[0])
            for b, n in enumerate(f_lens.tolist())
        ]
        active = [u for u in utts if u.result is None]
        while active:
            # Joint outputs for the likeliest input hypotheses not scored yet at their utterance's
            # frame, in one call: the log-probabilities of a hypothesis depend only on its tokens and
            # the frame, so scoring several ahead lets each utterance expand several per step, in the
            # same best-first order as one at a time.
            requests = [(u, node) for u in active for node in self._to_score(u)]
            if requests:
                nodes = [n for _, n in requests]
                store.compute(nodes)
                enc_rows = enc[[u.index for u, _ in requests], [u.t for u, _ in requests]]
                logits = model.joint_net(enc_rows + store.g[nodes])
                logp = torch.log_softmax(logits / opts.temperature, dim=-1)
                top_v, top_i = logp.topk(k, dim=-1)
                table = torch.cat([logp[:, blank : blank + 1], top_v, top_i.to(logp.dtype)], dim=1).tolist()
                for (u, node), row in zip(requests, table):
                    u.rows[node] = row
            for u in active:
                while not self._frame_over(u):
                    key = max(u.inputs, key=lambda key: u.inputs[key].score)
                    row = u.rows.get(u.inputs[key].node)
                    if row is None:
                        break  # a hypothesis made in this step: scored in the next
                    self._expand(u, u.inputs.pop(key), row, k, blank, topk_thresh, store)
                else:
                    self._end_frame(u, store)
            active = [u for u in active if u.result is None]
        return [store.tokens(u.result) for u in utts]

    def _expand(
        self,
        u: _Utterance,
        hyp: _Hyp,
        row: list[float],
        k: int,
        blank: int,
        topk_thresh: float,
        store: _PrefixStore,
    ) -> None:
        blank_lp, values, ids = row[0], row[1 : 1 + k], row[1 + k :]
        _merge(
            u.kept,
            store.text[hyp.node],
            _Hyp(hyp.score + blank_lp, hyp.node, hyp.length, hyp.symbols, hyp.lm_state, hyp.kw_state),
        )
        if hyp.symbols >= self.options.max_symbols_per_step:
            return
        floor = values[0] - topk_thresh
        for value, token in zip(values, ids):
            token = int(token)
            if value < floor:
                break
            if token == blank:
                continue
            node = store.child(hyp.node, token)
            score = hyp.score + value
            lm_state, kw_state = hyp.lm_state, hyp.kw_state
            piece = self.pieces[token]
            if self.ngram is not None and token not in self.user_tokens:
                lm_score, lm_state = self.ngram.score(lm_state, piece)
                score += lm_score
            if self.keywords is not None:
                bonus, kw_state = self.keywords.step(kw_state, piece)
                score += bonus
            _merge(
                u.inputs,
                store.text[node],
                _Hyp(score, node, hyp.length + 1, hyp.symbols + 1, lm_state, kw_state),
            )

    def _to_score(self, u: _Utterance) -> list[int]:
        """Nodes of the (at most 2 x beam_width) best unscored inputs that could still be expanded this frame.

        An input no better than the beam_width-th best kept hypothesis never will be: kept scores
        only grow, and the frame ends once beam_width of them beat the best input.
        """
        width = self.options.beam_width
        floor = -math.inf
        if len(u.kept) >= width:
            floor = sorted((h.score for h in u.kept.values()), reverse=True)[width - 1]
        waiting = [h for h in u.inputs.values() if h.node not in u.rows and h.score >= floor]
        if len(waiting) > 2 * width:
            waiting = sorted(waiting, key=lambda h: h.score, reverse=True)[: 2 * width]
        return [h.node for h in waiting]

    def _frame_over(self, u: _Utterance) -> bool:
        if not u.inputs:
            return True
        if len(u.kept) < self.options.beam_width:
            return False
        best_input = max(h.score for h in u.inputs.values())
        return sum(h.score > best_input for h in u.kept.values()) >= self.options.beam_width

    def _end_frame(self, u: _Utterance, store: _PrefixStore) -> None:
        opts = self.options
        candidates = list(u.kept.values())
        if u.inputs:
            best_input = max(h.score for h in u.inputs.values())
            candidates = [h for h in candidates if h.score > best_input]
        beam = sorted(candidates, key=lambda h: h.score, reverse=True)[: opts.beam_width]
        if opts.prune_score_thresh >= 0:
            floor = max(h.normalised for h in beam) - opts.prune_score_thresh
            beam = [h for h in beam if h.normalised >= floor]
        self._update_finals(u, beam, store)
        u.t += 1
        if u.t >= u.frames:
            u.result = max(beam, key=lambda h: h.normalised).node
            return
        for h in beam:
            h.symbols = 0
        u.inputs = {store.text[h.node]: h for h in beam}
        u.kept = {}
        u.rows = {}

    def _update_finals(self, u: _Utterance, beam: list[_Hyp], store: _PrefixStore) -> None:
        """Track finals; past ``final_emission_thresh`` seconds without one, drop the worst hypotheses until one is made."""
        thresh = self.options.final_emission_thresh
        while True:
            depth = store.common_ancestor_depth([h.node for h in beam])
            if len(beam) <= 1 or depth > u.final_depth:
                u.final_depth = max(depth, u.final_depth)
                u.last_final = u.t
                return
            if (
                thresh < 0
                or self.frame_seconds is None
                or (u.t - u.last_final) * self.frame_seconds <= thresh
            ):
                return
            beam.remove(min(beam, key=lambda h: h.normalised))


_WORKER_SEARCH: Optional[BeamSearch] = None


def _init_worker() -> None:
    # One thread per process: the processes are the parallelism.
    torch.set_num_threads(1)


def _worker_search(args: tuple[Tensor, Tensor]) -> list[list[int]]:
    assert _WORKER_SEARCH is not None
    with torch.no_grad():
        return _WORKER_SEARCH._search(*args)


def sentencepiece_pieces(model_bytes: bytes) -> list[str]:
    """The piece string of every id of a SentencePiece model (given as its bytes)."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def user_token_ids(pieces: Sequence[str]) -> list[int]:
    """Ids of user-defined tokens such as ``<EOS>``: pieces written as ``<...>``, other than ``<unk>``."""
    return [i for i, p in enumerate(pieces) if len(p) > 2 and p[0] == "<" and p[-1] == ">" and p != "<unk>"]
