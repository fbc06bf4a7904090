"""Routing over announced ranges, the server's choice of range, blocks records, wire checks, text pieces."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa

from garden.inference.blocks import LayerSpan
from garden.inference.client import SamplingConfig, _pick, _TextDecoder
from garden.inference.route import CoverageError, missing_spans, shortest_chain
from garden.inference.server import better_span, choose_span
from garden.protocol.inference_rpc import deserialize_hidden, serialize_hidden
from garden.protocol import signing
from garden.protocol.blocks import BlocksRecord, models_subkey
from garden.protocol.records import RecordError, check_fresh
from garden.protocol.serve_spec import parse_serve_spec

MODEL = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def rec(peer: str, start: int, end: int, throughput: float = 100.0, **extra: Any) -> BlocksRecord:
    fields = {
        "peer_id": peer, "model": MODEL, "start": start, "end": end, "num_layers": 30, "hidden_size": 576,
        "throughput": throughput, "free_cache_tokens": 1000, "max_sessions": 4, "max_session_tokens": 512,
        "announced_at": 1000.0,
    } | extra  # fmt: skip
    return BlocksRecord.model_validate(fields)


def test_the_chain_covers_every_layer_at_least_cost() -> None:
    records = [
        rec("A", 0, 10), rec("B", 10, 20, 10.0), rec("C", 10, 20, 1000.0), rec("D", 20, 30), rec("E", 0, 30, 100.0)
    ]
    chain = shortest_chain(records, MODEL, LayerSpan(0, 30))
    assert [(h.peer_id, str(h.span)) for h in chain] == [("A", "0-10"), ("C", "10-20"), ("D", "20-30")]
    # a slow server holding everything wins when the round trips to the others are long
    far = {"A": 1.0, "C": 1.0, "D": 1.0}
    assert [h.peer_id for h in shortest_chain(records, MODEL, LayerSpan(0, 30), far)] == ["E"]
    # a sub-range of a server's range
    assert [(h.peer_id, str(h.span)) for h in shortest_chain(records[:4], MODEL, LayerSpan(12, 20))] == [("C", "12-20")]


def test_a_gap_is_named() -> None:
    records = [rec("A", 0, 10), rec("D", 20, 30)]
    assert missing_spans(records, 30) == [LayerSpan(10, 20)]
    with pytest.raises(CoverageError, match="10-20"):
        shortest_chain(records, MODEL, LayerSpan(0, 30))


def test_a_server_picks_the_least_covered_layers() -> None:
    assert choose_span([], 30, 10) == LayerSpan(0, 10)
    assert choose_span([rec("A", 0, 10)], 30, 10) == LayerSpan(10, 20)
    assert choose_span([rec("A", 0, 10), rec("B", 10, 20)], 30, 10) == LayerSpan(20, 30)
    full = [rec("A", 0, 10), rec("B", 10, 20, 50.0), rec("C", 20, 30)]
    assert choose_span(full, 30, 10) == LayerSpan(10, 20)  # all held once: the slowest range
    assert choose_span([rec("me", 0, 10)], 30, 10, exclude="me") == LayerSpan(0, 10)
    assert choose_span([], 30, 99) == LayerSpan(0, 30)


def test_a_redundant_server_moves_to_a_gap_only() -> None:
    mine = LayerSpan(0, 10)
    both = [rec("me", 0, 10), rec("A", 0, 10), rec("B", 10, 20)]
    assert better_span(both, "me", mine, 30) == LayerSpan(20, 30)  # 0-10 held twice, 20-30 by no one
    alone = [rec("me", 0, 10), rec("B", 10, 20)]
    assert better_span(alone, "me", mine, 30) is None  # it is the only server of its layers: it stays
    full = [rec("me", 0, 10), rec("A", 0, 10), rec("B", 10, 20), rec("C", 20, 30)]
    assert better_span(full, "me", mine, 30) is None  # no gap: no reason to move


def test_blocks_records_are_sealed_and_checked(key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    peer = signing.peer_id_of(signing.public_key_der(key))
    good = rec(peer, 0, 10)
    assert BlocksRecord.from_wire(good.to_wire(key), peer) == good
    assert BlocksRecord.from_wire(good.to_wire(key), models_subkey(good), index=True) == good
    with pytest.raises(RecordError, match="signed by"):
        BlocksRecord.from_wire(good.to_wire(other), peer)  # announced in another's name
    with pytest.raises(RecordError, match="stored under"):
        BlocksRecord.from_wire(good.to_wire(key), "someone-else")
    with pytest.raises(RecordError):
        BlocksRecord.from_wire(b"\x00garbage", peer)
    with pytest.raises(ValueError, match="not within"):
        rec(peer, 10, 40)
    with pytest.raises(RecordError, match="claims to live"):
        check_fresh(1000.0, 1000.0 + 10 * 24 * 3600, 1000.0)  # a forged long life


def test_hidden_states_from_a_stranger_are_checked() -> None:
    ok = serialize_hidden(torch.randn(1, 3, 8), "bfloat16")
    assert deserialize_hidden(ok, 8, 4).shape == (1, 3, 8)
    with pytest.raises(RecordError, match="expected"):
        deserialize_hidden(ok, 8, 2)  # more tokens than allowed
    with pytest.raises(RecordError, match="non-finite"):
        deserialize_hidden(serialize_hidden(torch.full((1, 1, 8), float("inf")), "float32"), 8, 4)
    broken = serialize_hidden(torch.randn(1, 3, 8), "float32")
    broken.buffer = broken.buffer[:7]
    with pytest.raises(RecordError, match="undecodable"):
        deserialize_hidden(broken, 8, 4)


class _Chars:
    """A tokenizer whose tokens are characters (ids are code points)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_text_pieces_hold_back_a_possible_stop_string() -> None:
    decoder = _TextDecoder(_Chars(), ("STOP",))
    out = []
    for ch in "Hello STand STOP more":
        piece, stopped = decoder.add(ord(ch))
        out.append(piece)
        if stopped:
            break
    assert "".join(out) == "Hello STand " and stopped
    assert "ST" not in out[6] if len(out) > 6 else True


def test_sampling_is_seeded_and_top_p_cuts_the_tail() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, -5.0])
    greedy = SamplingConfig(temperature=0)
    assert _pick(logits, greedy, torch.Generator().manual_seed(0)) == 0
    narrow = SamplingConfig(temperature=1.0, top_p=0.5)
    assert {_pick(logits, narrow, torch.Generator().manual_seed(s)) for s in range(20)} == {0}
    wide = SamplingConfig(temperature=1.0, top_p=1.0)
    draws = [_pick(logits, wide, torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == [_pick(logits, wide, torch.Generator().manual_seed(s)) for s in range(40)] and len(set(draws)) > 1


def test_serve_values() -> None:
    assert parse_serve_spec("builtin:smollm2-135m").start is None
    spec = parse_serve_spec("builtin:smollm2-135m:0-15")
    assert (spec.model, spec.start, spec.end) == ("builtin:smollm2-135m", 0, 15)
    assert parse_serve_spec("HuggingFaceTB/SmolLM2-135M-Instruct:3-9").model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="empty"):
        parse_serve_spec("builtin:smollm2-135m:5-5")
