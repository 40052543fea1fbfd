"""The disaggregated path inside one process: prefill-only on engine P, copy blocks, decode on engine D."""

from __future__ import annotations

from pdserve.engine import EngineRequest, KVReservation, LLMEngine, RequestOutput


def copy_missing_blocks(
    src: LLMEngine, src_block_ids: tuple[int, ...], dst: LLMEngine, reservation: KVReservation
) -> int:
    """Copy every block the destination lacks (past its cached tokens), layer by layer, then stamp the
    reservation's epoch on them as a transport does; returns blocks sent."""
    first = reservation.num_cached_tokens // dst.layout.block_size
    src_ids, dst_ids = list(src_block_ids[first:]), list(reservation.block_ids[first:])
    for layer in range(src.layout.num_layers):
        if src_ids:
            k, v = src.kv.read_blocks(layer, src_ids)
            dst.kv.write_blocks(layer, dst_ids, k, v)
    dst.kv.block_epochs[dst_ids] = reservation.epoch
    return len(src_ids)


class LayerCopier:
    """A layer sink that copies layer i of the blocks the destination lacks the moment the engine reports it
    computed — before layer i+1 runs: the layer-pipelined push, synchronously. Output can only be exact if every
    layer really was complete when reported."""

    def __init__(self, src: LLMEngine, dst: LLMEngine, reservation: KVReservation) -> None:
        self.src, self.dst, self.reservation = src, dst, reservation
        self.layers: list[int] = []
        self.num_sent = 0

    def layer_done(self, layer: int, block_ids: list[int]) -> None:
        first = self.reservation.num_cached_tokens // self.dst.layout.block_size
        src_ids, dst_ids = block_ids[first:], list(self.reservation.block_ids[first:])
        if src_ids:
            k, v = self.src.kv.read_blocks(layer, src_ids)
            self.dst.kv.write_blocks(layer, dst_ids, k, v)
        self.layers.append(layer)
        if layer == self.src.layout.num_layers - 1:
            self.dst.kv.block_epochs[dst_ids] = self.reservation.epoch
            self.num_sent = len(src_ids)


def prefill_then_decode(
    prefill: LLMEngine, decode: LLMEngine, request: EngineRequest, pipelined: bool = False
) -> tuple[list[int], int]:
    """Run `request` split across two engines; returns (output tokens, blocks transferred). `pipelined`: blocks
    move layer by layer from the engine's layer hook, instead of after the prefill."""
    reservation = decode.reserve(request)
    assert reservation is not None, "decode engine has no room"
    copier = LayerCopier(prefill, decode, reservation) if pipelined else None
    prefill.add_request(request, prefill_only=True, layer_sink=copier)
    first = _run_until_held(prefill, request.request_id)
    assert first.kv_block_ids is not None
    if copier is not None:
        assert copier.layers == list(range(prefill.layout.num_layers))  # once per layer, in the final step only
        sent = copier.num_sent
    else:
        sent = copy_missing_blocks(prefill, first.kv_block_ids, decode, reservation)
    prefill.release(request.request_id)
    tokens = list(first.new_token_ids)
    logprob = first.new_logprobs[0] if first.new_logprobs else None
    final = decode.commit(request.request_id, tokens[0], logprob)
    if final is not None or first.finish_reason is not None:
        if final is None:
            decode.abort(request.request_id)
        return tokens, sent
    while decode.has_unfinished():
        for out in decode.step():
            tokens.extend(out.new_token_ids)
    return tokens, sent


def _run_until_held(engine: LLMEngine, request_id: str) -> RequestOutput:
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.kv_block_ids is not None:
                return out
