from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from fora_runtime import ConcurrentUseError, ForaSession, GenerationError, InputError

LABELS = np.array([1, 2])


def latents(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, 8, 8)).astype(np.float32)


def run_generation(session: ForaSession, x: np.ndarray, steps: int = 6) -> list[np.ndarray]:
    gen = session.start(steps, x.shape[0])
    outs = []
    for k in range(steps):
        outs.append(gen.step(x, 999 - 150 * k, class_labels=LABELS[: x.shape[0]]))
    return outs


@pytest.fixture
def session(tiny_engine: Path):
    with ForaSession(tiny_engine) as s:
        yield s


def test_generation_follows_the_schedule(session: ForaSession) -> None:
    gen = session.start(7, 2)
    assert gen.plan == (True, False, False, True, False, False, True)
    calls = []
    backend = session.backend
    real_full, real_reuse = backend.run_full, backend.run_reuse
    backend.run_full = lambda b: (calls.append("full"), real_full(b))[1]  # type: ignore[method-assign]
    backend.run_reuse = lambda b: (calls.append("reuse"), real_reuse(b))[1]  # type: ignore[method-assign]
    for k in range(7):
        gen.step(latents(), 900 - k, class_labels=LABELS)
    assert calls == ["full", "reuse", "reuse", "full", "reuse", "reuse", "full"]
    assert gen.done


def test_reuse_step_depends_on_timestep_and_latents(session: ForaSession) -> None:
    # Reuse skips attention and MLP: latents enter only through the patch embedding
    # residual, timesteps through the gates. Both must reach the output.
    full = {"timestep": np.full(2, 999.0, np.float32), "class_labels": LABELS}
    session.run_step("full", 2, {"latents": latents(seed=0), **full})
    base = session.run_step(
        "reuse",
        2,
        {"latents": latents(seed=0), "timestep": np.full(2, 900.0, np.float32), "class_labels": LABELS},
    )
    later = session.run_step(
        "reuse",
        2,
        {"latents": latents(seed=0), "timestep": np.full(2, 800.0, np.float32), "class_labels": LABELS},
    )
    other = session.run_step(
        "reuse",
        2,
        {"latents": latents(seed=5), "timestep": np.full(2, 900.0, np.float32), "class_labels": LABELS},
    )
    assert not np.allclose(base, later)
    assert not np.allclose(base, other)


def test_reuse_before_any_full_step_is_refused(tiny_engine: Path) -> None:
    with ForaSession(tiny_engine) as fresh:
        step = {"latents": latents(), "timestep": np.full(2, 900.0, np.float32), "class_labels": LABELS}
        with pytest.raises(GenerationError, match="batch 2 has no caches yet"):
            fresh.run_step("reuse", 2, step)


def test_batch_size_accepts_numpy_ints_and_refuses_floats(session: ForaSession) -> None:
    assert session.start(2, np.int64(2)).batch_size == 2
    with pytest.raises(InputError, match=re.escape("Batch size | got 2.0 | expected an integer")):
        session.start(2, 2.0)


def test_reuse_reads_the_cache_views_in_place(session: ForaSession) -> None:
    """The views are the memory both graphs are bound to: zeroing them changes the next
    reuse step, restoring them restores it; generations never move them."""
    views = session.cache_views(2)
    run_generation(session, latents())
    run_generation(session, latents(seed=3))
    assert all(a is b for a, b in zip(views.values(), session.cache_views(2).values(), strict=True))
    full = {"latents": latents(seed=1), "timestep": np.full(2, 999.0, np.float32), "class_labels": LABELS}
    reuse = {**full, "timestep": np.full(2, 900.0, np.float32)}
    session.run_step("full", 2, full)
    base = session.run_step("reuse", 2, reuse)
    written = {name: view.copy() for name, view in views.items()}
    for view in views.values():
        view[...] = 0
    zeroed = session.run_step("reuse", 2, reuse)
    for name, view in views.items():
        view[...] = written[name]
    assert np.abs(zeroed - base).max() > 1e-3
    np.testing.assert_array_equal(session.run_step("reuse", 2, reuse), base)
    # One arena: every cache is a view of the same allocation.
    assert len({id(view.base) for view in views.values()}) == 1


def test_full_step_writes_caches_in_place(session: ForaSession) -> None:
    views = session.cache_views(2)
    session.run_step(
        "full",
        2,
        {"latents": latents(seed=1), "timestep": np.full(2, 999.0, np.float32), "class_labels": LABELS},
    )
    first = {n: v.copy() for n, v in views.items()}
    session.run_step(
        "full",
        2,
        {"latents": latents(seed=2), "timestep": np.full(2, 999.0, np.float32), "class_labels": LABELS},
    )
    assert all(not np.array_equal(first[n], views[n]) for n in views)


def test_two_sessions_interleaved_equal_sequential(tiny_engine: Path) -> None:
    x1, x2 = latents(seed=1), latents(seed=2)
    with ForaSession(tiny_engine) as reference:
        expected1 = run_generation(reference, x1)
        expected2 = run_generation(reference, x2)
    with ForaSession(tiny_engine) as s1, ForaSession(tiny_engine) as s2:
        g1, g2 = s1.start(6, 2), s2.start(6, 2)
        got1, got2 = [], []
        for k in range(6):
            got1.append(g1.step(x1, 999 - 150 * k, class_labels=LABELS))
            got2.append(g2.step(x2, 999 - 150 * k, class_labels=LABELS))
    for a, b in zip(got1 + got2, expected1 + expected2, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prediction_is_a_copy_the_caller_may_keep(session: ForaSession) -> None:
    gen = session.start(2, 2)
    first = gen.step(latents(seed=1), 999, class_labels=LABELS)
    kept = first.copy()
    gen.step(latents(seed=2), 500, class_labels=LABELS)
    np.testing.assert_array_equal(first, kept)


def test_batch_outside_built_range(session: ForaSession) -> None:
    with pytest.raises(InputError, match=re.escape("got 5, the engines were built for 1..4")):
        session.start(4, 5)


def test_wrong_latent_shape(session: ForaSession) -> None:
    gen = session.start(4, 2)
    with pytest.raises(
        InputError, match=re.escape("Input 'latents' | got shape [2, 4, 16, 16], expected [2, 4, 8, 8]")
    ):
        gen.step(np.zeros((2, 4, 16, 16), np.float32), 999, class_labels=LABELS)


def test_wrong_latent_dtype(session: ForaSession) -> None:
    gen = session.start(4, 2)
    with pytest.raises(InputError, match="got float64, expected float32"):
        gen.step(np.zeros((2, 4, 8, 8)), 999, class_labels=LABELS)


def test_class_label_out_of_range(session: ForaSession) -> None:
    gen = session.start(4, 2)
    # 10 classes + the null class (index 10) are valid; 11 is not.
    gen.step(latents(), 999, class_labels=np.array([0, 10]))
    with pytest.raises(InputError, match=re.escape("values 3..11 outside [0, 10]")):
        gen.step(latents(), 999, class_labels=np.array([3, 11]))


def test_missing_and_unknown_inputs(session: ForaSession) -> None:
    gen = session.start(4, 2)
    with pytest.raises(InputError, match=re.escape("Input 'class_labels' | missing")):
        gen.step(latents(), 999)
    with pytest.raises(InputError, match="not inputs of these engines"):
        gen.step(latents(), 999, class_labels=LABELS, encoder_hidden_states=np.zeros(3))


def test_stale_generation_is_refused(session: ForaSession) -> None:
    old = session.start(4, 2)
    old.step(latents(), 999, class_labels=LABELS)
    session.start(4, 1)  # a new generation (another batch size) owns the session now
    with pytest.raises(GenerationError, match="stale"):
        old.step(latents(), 900, class_labels=LABELS)


def test_finished_generation_is_refused(session: ForaSession) -> None:
    gen = session.start(1, 2)
    gen.step(latents(), 999, class_labels=LABELS)
    with pytest.raises(GenerationError, match="all 1 steps already ran"):
        gen.step(latents(), 999, class_labels=LABELS)


def test_timestep_accepts_ints_scalars_and_arrays(session: ForaSession) -> None:
    outs = []
    for t in (500, 500.0, np.array([500, 500]), np.array([500.0, 500.0], np.float32)):
        outs.append(session.start(1, 2).step(latents(), t, class_labels=LABELS))
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_non_numeric_timestep(session: ForaSession) -> None:
    gen = session.start(2, 2)
    with pytest.raises(InputError, match="expected a number or one number per sample"):
        gen.step(latents(), "late", class_labels=LABELS)


def test_unchecked_inputs_give_the_same_results(tiny_engine: Path) -> None:
    x = latents(seed=4)
    with ForaSession(tiny_engine) as checked, ForaSession(tiny_engine, check_inputs=False) as fast:
        for a, b in zip(run_generation(checked, x), run_generation(fast, x), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_second_thread_is_refused_while_a_call_of_the_first_runs(tiny_engine: Path) -> None:
    """Two threads staging inputs into one session's buffers gave wrong latents, silently:
    while one thread's step runs, every call of another thread is refused."""
    with ForaSession(tiny_engine) as session:
        gen = session.start(3, 2)
        inside, leave = threading.Event(), threading.Event()
        real_full = session.backend.run_full

        def held_full(buffers: object) -> None:
            inside.set()  # the worker is inside its step; hold it there
            assert leave.wait(30)
            real_full(buffers)  # type: ignore[arg-type]

        session.backend.run_full = held_full  # type: ignore[method-assign]
        results: list[np.ndarray] = []
        worker = threading.Thread(
            target=lambda: results.append(gen.step(latents(seed=1), 999, class_labels=LABELS)), name="worker"
        )
        worker.start()
        step = {"latents": latents(), "timestep": np.full(2, 999.0, np.float32), "class_labels": LABELS}
        try:
            assert inside.wait(30)
            for call in (
                lambda: session.start(3, 2),
                lambda: gen.step(latents(), 999, class_labels=LABELS),
                lambda: session.run_step("full", 2, step),
                lambda: session.read_caches(2),
            ):
                with pytest.raises(
                    ConcurrentUseError,
                    match=r"called in thread 'MainThread' while thread 'worker' runs a call",
                ):
                    call()
        finally:
            leave.set()
            worker.join(30)
        session.backend.run_full = real_full  # type: ignore[method-assign]
        # The worker's step ran undisturbed; the session (and the generation) now serve this thread.
        with ForaSession(tiny_engine) as reference:
            expected = reference.start(3, 2).step(latents(seed=1), 999, class_labels=LABELS)
        assert len(results) == 1 and gen.step_index == 1
        np.testing.assert_array_equal(results[0], expected)
        gen.step(latents(), 900, class_labels=LABELS)
        assert gen.step_index == 2
