"""Concurrent calls on one patched model give what the same calls give one after another.

Servers call one model from a pool of threads. Two threads with different batch sizes and
images run through one patched model; a barrier in a pre-hook of the block after the last
reduction layer makes every call of one thread wait there for a call of the other, so
both forwards are always in flight together: a thread's second half runs after the other
thread started its own forward (whatever a forward keeps on the model is overwritten by
then). Intra-op threads are set to 1, so the same call is bitwise the same computation.
"""

from __future__ import annotations

import threading

import pytest
import torch
from every_method import BIAS_METHODS, LAYERS, PATCHES, images, patched

import evit_patch
from evit_patch.dynamicvit import dynamicvit_state, is_dynamicvit

CALLS = 3
BATCHES = (2, 5)


def _record(model: torch.nn.Module) -> list[torch.Tensor]:
    """What the calling thread's last forward left: the token maps (reducers) or the kept
    indices (DynamicViT)."""
    if is_dynamicvit(model):
        return [index.clone() for index in dynamicvit_state(model).record.kept_indices]
    return [tensor for layer in evit_patch.kept_tokens(model) for tensor in (layer.kept_index, layer.token_of_patch,
                                                                              layer.status)]


def _calls(model: torch.nn.Module, batch: int, results: list) -> None:
    with torch.no_grad():
        for call in range(CALLS):
            output = model(images(batch, seed=100 * batch + call))
            results.append((output, _record(model)))


@pytest.fixture
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("method", "model_kind"), [(method, kind) for kind in ("vit", "rotary") for method in PATCHES] +
                         [(method, "bias") for method in BIAS_METHODS])
def test_concurrent_calls_equal_calls_one_after_another(method, model_kind, one_intra_op_thread):
    model = patched(method, model_kind)
    alone = {batch: [] for batch in BATCHES}
    for batch in BATCHES:
        _calls(model, batch, alone[batch])

    barrier = threading.Barrier(len(BATCHES), timeout=60)
    def meet(*_) -> None:
        barrier.wait()

    meeting = model.blocks[LAYERS[-1] + 1].register_forward_pre_hook(meet)
    together = {batch: [] for batch in BATCHES}
    errors: list[BaseException] = []

    def run(batch: int) -> None:
        try:
            _calls(model, batch, together[batch])
        except BaseException as error:  # reported below, with the thread's own traceback
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(batch,)) for batch in BATCHES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    meeting.remove()
    if errors:
        raise errors[0]
    for batch in BATCHES:
        assert len(together[batch]) == CALLS
        for (output, record), (expected, expected_record) in zip(together[batch], alone[batch]):
            assert torch.equal(output, expected), f"{method}: a batch-{batch} call changed under concurrency"
            assert len(record) == len(expected_record)
            assert all(torch.equal(a, b) for a, b in zip(record, expected_record)), f"{method}: record of another call"


def test_kept_tokens_is_the_calling_threads_last_forward():
    model = patched("evit")
    with torch.no_grad():
        model(images(3, seed=0))
    seen: list = []
    worker = threading.Thread(target=lambda: seen.append(_forward_and_record(model)))
    worker.start()
    worker.join()
    assert seen[0][0].shape[0] == 1  # the worker's own batch of 1
    assert evit_patch.kept_tokens(model)[0].kept_index.shape[0] == 3  # this thread's batch of 3, untouched
    fresh = threading.Thread(target=lambda: seen.append(_record_error(model)))
    fresh.start()
    fresh.join()
    assert "no token record yet" in seen[1]  # a thread that ran no forward has no record


def _forward_and_record(model: torch.nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        model(images(1, seed=1))
    return [layer.kept_index for layer in evit_patch.kept_tokens(model)]


def _record_error(model: torch.nn.Module) -> str:
    try:
        evit_patch.kept_tokens(model)
    except RuntimeError as error:
        return str(error)
    return ""


@pytest.mark.parametrize("method", ["evit", "tome"])
def test_concurrent_dense_calls_equal_calls_one_after_another(method, one_intra_op_thread):
    """forward_intermediates hooks the shared blocks for its own call: another thread's forward,
    dense or not, passes them untouched."""
    model = patched(method)

    def dense(batch: int) -> list[torch.Tensor]:
        with torch.no_grad():
            final, intermediates = model.forward_intermediates(images(batch, seed=batch), indices=[1, 3])
        return [final, *intermediates]

    def plain(batch: int) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(images(batch, seed=batch))]

    calls = {2: dense, 5: dense, 3: plain}
    alone = {batch: call(batch) for batch, call in calls.items()}
    barrier = threading.Barrier(len(calls), timeout=60)

    def meet(*_) -> None:
        barrier.wait()

    meeting = model.blocks[LAYERS[-1] + 1].register_forward_pre_hook(meet)
    together: dict[int, list[torch.Tensor]] = {}
    threads = [threading.Thread(target=lambda b=batch, c=call: together.setdefault(b, c(b))) for batch, call in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    meeting.remove()
    for batch in calls:
        assert len(together[batch]) == len(alone[batch])
        assert all(torch.equal(a, b) for a, b in zip(together[batch], alone[batch])), f"{method}: batch {batch}"
